"""Recipe defaults shared by the configurations and the code that uses them (no imports: torch-free)."""

TEACHER_DECAY = 0.997  # EMA teacher of CMW-Net-SL (the authors' WebVision / Animal-10N transfer)
MIXUP_ALPHA = 1.0  # Beta(a, a) of CMW-Net-SL's mixup
