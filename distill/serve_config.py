"""`anyo serve`'s settings: one checked dataclass, each field the command-line flag `--NAME` (dashes for
underscores), so the parser, the help text and the checks come from one place. Lives apart from
distill.server so that the parser does not import FastAPI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from distill.checked import Section, option
from distill.errors import ConfigError

# what runs the exported encoder (distill.recommender): model.onnx, model.int8.onnx, model.safetensors
RUNTIMES = ("onnxruntime", "onnxruntime-int8", "torch")
QUANTIZATIONS = ("int8",)   # `anyo export --quantize`: model.int8.onnx, served by --runtime onnxruntime-int8
MAX_HISTORY = 10_000        # ids in one history
MAX_BATCH = 1_024           # histories in one /recommend/batch request
MAX_BATCH_IDS = 200_000     # ids in one batch request, all histories together
MAX_BODY_BYTES = 4 << 20    # request body


@dataclass
class ServeConfig(Section):
    host: str = option("address to listen on", "127.0.0.1", nonempty=True)
    port: int = option("TCP port; 0 picks a free one (the real port is printed)", 8000, min=0, max=65535)
    workers: int = option("uvicorn worker processes (each loads the same snapshot of the export)", 1, min=1, max=64)
    threads: int = option("torch (and ONNX Runtime) threads per worker", 1, min=1, max=256)
    runtime: str | None = option("encoder runtime: onnxruntime (model.onnx), onnxruntime-int8 (model.int8.onnx, "
                                 "an export made with --quantize int8) or torch; default onnxruntime when "
                                 "installed", None, choices=RUNTIMES)
    max_batch: int = option("histories in one model call for /recommend: concurrent requests are answered "
                            "together up to this many", 64, min=1, max=MAX_BATCH)
    piece_histories: int = option("histories in one model call for /recommend/batch: a batch is cut into pieces of "
                                  "at most this many (fewer for a large k), answered one after another by the "
                                  "batch lane, a process of its own (smaller: a timed-out batch stops sooner)", 16,
                                  min=1, max=MAX_BATCH)
    batch_wait_ms: float = option("how long a /recommend waits for others to share its model call (0: none)",
                                  1.0, min=0.0, max=1000.0)
    max_queue: int = option("histories waiting for the model, all requests together; a request beyond it is "
                            "answered 503 with Retry-After", 4096, min=MAX_BATCH)
    max_concurrency: int = option("requests in progress at once (/health and /metrics aside); beyond it 503 "
                                  "with Retry-After", 256, min=1)
    request_timeout_s: float = option("a request not answered within this many seconds is answered 503", 30.0,
                                      gt=0.0, max=3600.0)
    max_response_items: int = option("histories x k in one answer; a larger request is answered 422",
                                     2_000_000, min=1)
    max_header_bytes: int = option("bytes of request line and headers; more is answered 431", 16_384, min=1_024)
    read_timeout_s: float = option("a request (headers and body) must arrive within this many seconds of its "
                                   "connection, or of the previous answer on it; else the connection is closed",
                                   10.0, gt=0.0, max=3600.0)
    keep_alive_s: int = option("an idle keep-alive connection is closed after this many seconds", 5, min=1,
                               max=3600)

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def from_args(cls, args) -> "ServeConfig":
        """The settings from parsed arguments; a bad value is named by its flag (`--max-batch: must be ...`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        try:
            return cls(**values)
        except ConfigError as e:
            name, _, why = str(e).partition(": ")
            raise ConfigError(f"{cls.flag(name)}: {why}") from None
