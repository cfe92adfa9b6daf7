"""Headless ComfyUI for integration tests: a real `main.py --cpu` server on a free loopback port.

The pack is symlinked into a temporary base directory (custom_nodes, models, input, output, user),
API-format workflows are POSTed to /prompt and /history/<id> is polled with bounded waits. The
server is always killed by stop() (use it as a context manager).

Besides this pack, a one-file test pack is written next to it with two nodes the tests need:
LowBitTestConditioning (seeded random FLUX conditioning, for tiny models whose text width no real
text encoder has), LowBitTestLiveModules (counts live quantized modules, for leak checks) and
LowBitTestModules (names in the server's sys.modules containing a string, for import checks). It also applies
COMPAT (below) in the server.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
# ComfyUI 0.29's comfy/text_encoders/flux.py load_mistral_tokenizer calls transformers' MistralConverter with
# vocab= / additional_special_tokens= (transformers 4.x); transformers 5.x's takes a tekken file path instead, so
# with it no FLUX.2 [dev] text encoder (16-bit or lowbit) can build its tokenizer. Test-only: fall back to the
# file-path form there. Nothing of comfyui-lowbit depends on it.
COMPAT = '''
def _patch_mistral_tokenizer():
    import inspect
    import tempfile
    try:
        import comfy.text_encoders.flux as flux_te
        from transformers.integrations.mistral import MistralConverter
    except Exception:
        return
    if "vocab_file" not in inspect.signature(MistralConverter.__init__).parameters or \\
            getattr(flux_te.load_mistral_tokenizer, "lowbit_compat", False):
        return

    def load_mistral_tokenizer(data):
        import torch
        if torch.is_tensor(data):
            data = data.numpy().tobytes()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            f.write(data)
        return {"tokenizer_object": MistralConverter(vocab_file=f.name).converted(), "legacy": False}

    load_mistral_tokenizer.lowbit_compat = True
    flux_te.load_mistral_tokenizer = load_mistral_tokenizer


_patch_mistral_tokenizer()
'''


def apply_compat() -> None:
    """COMPAT in this process (in-process ComfyUI tests)."""
    exec(COMPAT, {})


TEST_PACK = COMPAT + '''
import gc
import torch


class LowBitTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 8}),
                             "context_dim": ("INT", {"default": 64}), "pooled_dim": ("INT", {"default": 32})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "lowbit_test"

    def make(self, seed, tokens, context_dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[cond, {"pooled_output": pooled}]],)


class LowBitTestLiveModules:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0})}, "optional": {"after": ("LATENT",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "count"
    CATEGORY = "lowbit_test"

    def count(self, nonce, after=None):
        gc.collect()
        n = sum(1 for o in gc.get_objects()
                if isinstance(o, torch.nn.Module) and any(c.__name__ == "LowBitLinear" for c in type(o).__mro__))
        return {"ui": {"live": [n]}}


class LowBitTestModules:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"contains": ("STRING", {"default": "triton"}), "nonce": ("INT", {"default": 0})},
                "optional": {"after": ("LATENT",)}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "list"
    CATEGORY = "lowbit_test"

    def list(self, contains, nonce, after=None):
        import sys
        return {"ui": {"modules": sorted(m for m in sys.modules if contains in m)}}


NODE_CLASS_MAPPINGS = {"LowBitTestConditioning": LowBitTestConditioning, "LowBitTestLiveModules": LowBitTestLiveModules,
                       "LowBitTestModules": LowBitTestModules}
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    pass


class ComfyServer:
    def __init__(self, comfy_path: str, base_dir: Path, python: str = sys.executable, start_timeout: float = 180,
                 extra_args: list[str] = (), env: dict | None = None):
        self.comfy_path = Path(comfy_path)
        self.extra_args = list(extra_args)
        self.env_overrides = dict(env or {})  # name -> value, or None to remove it from the server's environment
        self.base = Path(base_dir)
        self.python = python
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = self.base / "server.log"
        self.models = self.base / "models"
        self.output = self.base / "output"

    # -- lifecycle ---------------------------------------------------------------------------
    def _layout(self):
        for d in ("custom_nodes", "models/diffusion_models", "models/text_encoders", "models/loras",
                  "input", "output", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "comfyui_lowbit"
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)
        (self.base / "custom_nodes" / "lowbit_test_nodes.py").write_text(TEST_PACK)

    def start(self):
        self._layout()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        env.pop("LOWBIT_BACKEND", None)
        # tiny models gain nothing from intra-op threads, and on a shared CPU spinning OpenMP threads make
        # small SVDs / matmuls 10-20x slower
        env.setdefault("OMP_NUM_THREADS", "1")
        for k, v in self.env_overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.start_timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(data) if data else None

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        """Queue an API-format workflow, wait for it, raise ComfyError on any node error; the history entry."""
        entry = self._finished(workflow, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success" or not status.get("completed", False):
            msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            raise ComfyError(f"prompt failed: {json.dumps(msgs)[:3000]}\n{self.log_tail(30)}")
        return entry

    def error_of(self, workflow: dict, timeout: float = 300) -> dict:
        """Queue a workflow that must fail while executing; its execution_error message (node_type,
        exception_type, exception_message, traceback, ...)."""
        entry = self._finished(workflow, timeout)
        errors = [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        if not errors:
            raise ComfyError(f"the prompt did not fail: {json.dumps(entry.get('status'))[:1000]}")
        return errors[0]

    def _finished(self, workflow: dict, timeout: float) -> dict:
        resp = self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
        if resp.get("node_errors"):
            raise ComfyError(f"node errors: {json.dumps(resp['node_errors'])[:2000]}")
        pid = resp["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died ({self.proc.returncode}) while running:\n{self.log_tail()}")
            hist = self.get(f"/history/{pid}")
            if hist and pid in hist:
                return hist[pid]
            time.sleep(0.25)
        raise ComfyError(f"prompt {pid} did not finish within {timeout}s:\n{self.log_tail()}")

    def get_text(self, path: str, timeout: float = 10) -> tuple[int, str]:
        """(HTTP status, body) of a GET, errors included."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def free(self, unload_models: bool = True):
        self.post("/free", {"unload_models": unload_models, "free_memory": True})

    def rss_mb(self) -> float:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise ComfyError("VmRSS not found")

    def object_info(self, node: str) -> dict:
        return self.get(f"/object_info/{node}")[node]


def output_files(entry: dict, node_id: str, key: str) -> list:
    """The `key` list of a node's UI output in a history entry."""
    return entry.get("outputs", {}).get(node_id, {}).get(key, [])
