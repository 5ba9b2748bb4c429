"""The toolkit's torch-free vocabulary: names and constants that configurations, the CLI and the library share.

Nothing here imports torch (or anything of the package but the version), so the CLI's option tables and every
``--help`` can read it for free, and any layer may import it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmw-transfer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

# loss = sum(c * l): batch (w / B, the paper), sum (w / sum w, the authors' LT code), none (w)
NORMALIZATIONS = ("batch", "sum", "none")

TEACHER_DECAY = 0.997  # EMA teacher of CMW-Net-SL (the authors' WebVision / Animal-10N transfer)
MIXUP_ALPHA = 1.0  # Beta(a, a) of CMW-Net-SL's mixup

# --log: epoch loggers beside metrics.jsonl (cmw_transfer.metrics.loggers); the engine runs them for every stage
LOGGERS = ("csv", "tensorboard")
TENSORBOARD_HINT = "pip install 'cmw-transfer[tensorboard]'"

# CurveNet (docs/curvenet.md): its two modes, the probe's record file, and the probe-schedule fields (fractions of
# the run, lr multiples) a transferred CurveNet must find unchanged
CURVENET_MODES = ("faithful", "transferable")
PROBE_NAME = "probe.json"
SCHEDULE_KEYS = ("drop_fraction", "cycle_fraction", "cycle_high", "cycle_low")
