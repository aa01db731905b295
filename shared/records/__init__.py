"""What runs leave behind: run directories, logs, checkpoints, images and plots."""
