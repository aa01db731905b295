"""Classifier-free guidance (Ho & Salimans 2022) and text prompts that name a class.

    ε̃(x_t, y) = ε_θ(x_t, ∅) + w · (ε_θ(x_t, y) − ε_θ(x_t, ∅))        (Ho & Salimans 2022, Eq. 6,
                                                                     written with w = 1 + their w)

w = 0 is the unconditional model, w = 1 the plain conditional model, w > 1 pushes samples towards
what makes the class recognisable (at some cost in diversity). ∅ is the learned null class
(`model.null_class`) the network saw for a fraction of training examples.
"""
from __future__ import annotations

from typing import Sequence

import torch

from shared.errors import UserError
from shared.model.precision import autocast

# Number words for the MNIST digits; other datasets add their class names below.
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion-mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                      "bag", "ankle boot"),
}
# Guidance scales above this are refused: past it samples saturate, and it bounds what the API accepts.
MAX_GUIDANCE = 20.0


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


def check_labels(labels: torch.Tensor | Sequence[int] | None, n: int, num_classes: int) -> torch.Tensor | None:
    """Labels as a LongTensor [n] in [0, num_classes); None stays None (unconditional sampling)."""
    if labels is None:
        return None
    if num_classes < 1:
        raise UserError("this model is unconditional (num_classes=0): it takes no class labels")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() != n:
        raise UserError(f"{labels.numel()} labels given for {n} samples")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes - 1}], got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε̃ = ε_u + w·(ε_c − ε_u) for [N x C x H x W] predictions."""
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"eps_cond {tuple(eps_cond.shape)} and eps_uncond {tuple(eps_uncond.shape)} differ")
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def model_eps(model: torch.nn.Module, x_t: torch.Tensor, t: int, labels: torch.Tensor | None,
              guidance_scale: float = 1.0, precision: str = "fp32"):
    """Runs ε_θ for one sampler step, with both guidance passes batched into one forward.

    x_t: [N x C x H x W]; t: one int for the batch; labels: LongTensor [N] or None.
    Returns (eps, eps_uncond), float32 like x_t: eps_uncond is None when one pass gives ε̃ exactly —
    an unconditional model or no labels (ε_θ(x, ∅)), w = 1 (ε_c alone) or w = 0 (ε_u alone) — and
    otherwise the caller combines with `cfg_combine(eps, eps_uncond, w)` (or hands both to a fused step).
    """
    n = x_t.shape[0]
    t_batch = torch.full((n,), int(t), dtype=torch.long, device=x_t.device)
    with torch.no_grad(), autocast(x_t.device, precision):
        if labels is None or getattr(model, "num_classes", 0) == 0:
            return model(x_t, t_batch).to(x_t.dtype), None
        if guidance_scale == 1.0:
            return model(x_t, t_batch, labels).to(x_t.dtype), None
        null = torch.full_like(labels, model.null_class)
        if guidance_scale == 0.0:
            return model(x_t, t_batch, null).to(x_t.dtype), None
        # One forward of 2N: rows [0, N) conditional, [N, 2N) the null class.
        both = model(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
        eps_cond, eps_uncond = both.to(x_t.dtype).chunk(2)
        return eps_cond, eps_uncond


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
