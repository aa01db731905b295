"""Text prompts that name a class, and the interactive prompt loop of stage 5.

'seven', ' Seven ', 'SE VEN' and '7' all name class 7: case and whitespace are ignored. Datasets with
named classes (CIFAR-10, Fashion-MNIST) also accept their class names.
"""
from __future__ import annotations

from shared.errors import UserError

# Number words for the MNIST digits; other datasets add their class names below.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion-mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle boot"),
}


class PromptError(UserError):
    """A prompt that names no class this model knows."""


def _normalise(text: str) -> str:
    return "".join(str(text).split()).lower()


def prompt_vocabulary(num_classes: int = 10, dataset: str | None = None) -> dict[str, int]:
    """Every accepted spelling (whitespace removed, lower case) → class index."""
    vocab = {str(k): k for k in range(num_classes)}
    for k, word in enumerate(NUMBER_WORDS[:num_classes]):
        vocab[word] = k
    for k, name in enumerate(CLASS_NAMES.get(dataset or "", ())[:num_classes]):
        vocab[_normalise(name)] = k
    return vocab


def parse_prompt(text: str, num_classes: int = 10, dataset: str | None = None) -> int:
    """'seven', ' Seven ', 'SE VEN', '7' → 7. Case and whitespace are ignored.

    Raises PromptError listing what is accepted when the text names no class in [0, num_classes).
    """
    if num_classes < 1:
        raise PromptError("this model is unconditional (no classes): prompts cannot be used")
    vocab = prompt_vocabulary(num_classes, dataset)
    key = _normalise(text)
    if key in vocab:
        return vocab[key]
    words = [w for w in NUMBER_WORDS[:num_classes]]
    names = list(CLASS_NAMES.get(dataset or "", ())[:num_classes])
    accepted = f"a digit 0-{num_classes - 1}" + (f", a number word ({', '.join(words)})" if words else "")
    if names:
        accepted += f", or a class name ({', '.join(names)})"
    raise PromptError(f"cannot read {str(text)!r} as a class; accepted: {accepted} "
                      "(case and spaces are ignored)")


QUIT_WORDS = ("quit", "exit", "q")


def prompt_loop(read_line, on_class, on_grid, write, num_classes: int = 10, dataset: str | None = None) -> int:
    """The interactive prompt: each line is a class (digit or word), 'grid', or 'quit'.

    read_line() returns the next line or raises EOFError; on_class(k) / on_grid() draw and return a
    message; write(text) shows text. Bad entries print the accepted forms and the loop goes on; end of
    input or 'quit' ends it. Returns the number of pictures drawn.
    """
    drawn = 0
    write(f"type a class (0-{num_classes - 1} or a number word), 'grid', or 'quit'")
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):
            write("bye")
            return drawn
        key = _normalise(line)
        if not key:
            continue
        if key in QUIT_WORDS:
            write("bye")
            return drawn
        try:
            write(on_grid() if key == "grid" else on_class(parse_prompt(line, num_classes, dataset)))
            drawn += 1
        except UserError as err:
            write(f"error: {err}")
