"""The cached launch path of the decode kernels: its key and its fall-backs (CPU), and on a GPU
that it runs the same binaries as Triton's own launch."""

import inspect

import pytest
import torch

pytest.importorskip("triton", reason="needs Triton (pip install 'kvtuner[dev]')")

from kvtuner.kernels import launcher as launch  # noqa: E402


def key(*args, **kw):
    return launch.spec_key(args, kw)


def test_key_follows_tensor_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float16)
    y = torch.ones(64, dtype=torch.float16)
    assert key(x) == key(y)  # data does not matter, only what Triton specialises on
    assert key(x) != key(x[1:])  # 2-byte offset: no longer 16-byte aligned
    assert key(x) == key(x[8:])  # 16-byte offset: aligned again
    assert key(x) != key(x.float())


def test_key_follows_integer_properties_and_constexpr_values():
    assert key(16) == key(4096)  # both divisible by 16
    assert key(16) != key(17)
    assert key(1) != key(17)  # Triton turns 1 into a constant
    assert key(32) != key(2**31 + 32)  # int32 vs int64 argument
    assert key(2**63) != key(2**62)  # int64 vs uint64
    assert key(0.5) == key(3.0)
    assert key(True) != key(1) and key(True) != key(False)
    assert key(None) != key(0)
    assert key(BLOCK=16) != key(BLOCK=32)  # keywords (constexprs, launch options) by value
    with pytest.raises(TypeError, match="not supported"):
        key("text")


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.runs.append(args)


class FakeKernel:
    """Stands for a JITFunction ``k(X, n, BLOCK: constexpr, FLAG: constexpr = 7)``."""

    def __init__(self):
        self.slow = []
        self.compiled = FakeCompiled()
        params = inspect.signature(lambda X, n, BLOCK, FLAG=7: None).parameters.values()
        self.params = [type("P", (), {"name": p.name, "default": p.default}) for p in params]

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return self.compiled
        return launch_


@pytest.fixture
def launcher(monkeypatch):
    current = {"device": 0}
    monkeypatch.setattr(launch.CachedLauncher, "device", staticmethod(lambda: current["device"]))
    monkeypatch.setattr(launch.CachedLauncher, "stream", staticmethod(lambda device: f"stream{device}"))
    out = launch.CachedLauncher(FakeKernel())
    out.current = current
    return out


def test_launcher_reuses_the_binary_for_the_same_key(launcher):
    k = launcher.kernel
    x = torch.zeros(32)
    assert launcher((4, 2), x, 64, BLOCK=16, num_warps=4) is k.compiled
    assert len(k.slow) == 1 and not k.compiled.runs
    launcher((8,), x, 128, BLOCK=16, num_warps=4)  # same key: direct launch, constexpr default filled in
    assert len(k.slow) == 1 and launcher.hits == 1
    grid_and_stream, tail = k.compiled.runs[0][:4], k.compiled.runs[0][4:]
    assert grid_and_stream == (8, 1, 1, "stream0")
    assert tail[:3] == ("fn", "meta", None) and tail[5:] == (x, 128, 16, 7)
    launcher((8,), x, 17, BLOCK=16, num_warps=4)  # n no longer divisible by 16: Triton's path again
    launcher((8,), x, 128, BLOCK=32, num_warps=4)  # another constexpr value
    launcher((8,), x[1:], 128, BLOCK=16, num_warps=4)  # misaligned pointer
    assert len(k.slow) == 4 and launcher.hits == 1
    launcher.current["device"] = 1  # binaries are per device
    launcher((8,), x, 128, BLOCK=16, num_warps=4)
    assert len(k.slow) == 5 and launcher.hits == 1


def test_launcher_falls_back_when_the_direct_path_fails(launcher):
    k = launcher.kernel
    x = torch.zeros(32)
    launcher((1,), x, 16, BLOCK=16)

    def broken(*args):
        raise AttributeError("no such internal API")
    k.compiled.run = broken
    assert launcher((1,), x, 16, BLOCK=16) is k.compiled  # still launched, by Triton's path
    assert len(k.slow) == 2 and not launcher.enabled
    launcher((1,), x, 16, BLOCK=16)
    assert len(k.slow) == 3  # stays on the ordinary path


def test_launcher_without_a_device_takes_tritons_path(monkeypatch):
    def no_device():
        raise RuntimeError("no CUDA device")
    monkeypatch.setattr(launch.CachedLauncher, "device", staticmethod(no_device))
    launcher = launch.CachedLauncher(FakeKernel())
    launcher((1,), torch.zeros(4), 16, BLOCK=16)
    launcher((1,), torch.zeros(4), 16, BLOCK=16)
    assert len(launcher.kernel.slow) == 2 and not launcher.cache


def test_launcher_passes_unsupported_arguments_to_triton(launcher):
    launcher((1,), "not a tensor", 16, BLOCK=16)
    launcher((1,), "not a tensor", 16, BLOCK=16)
    assert len(launcher.kernel.slow) == 2 and not launcher.cache


def test_offline_compiler_captures_the_split_launch():
    """benchmarks/compile_offline.py screens kernel variants on a CPU machine; the launch it builds
    (``kernels.plan_launch``) must bind every kernel parameter, as the GPU launch does."""
    import importlib.util
    import inspect
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_offline.py"
    spec = importlib.util.spec_from_file_location("compile_offline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args, kwargs = mod.launch_args(4, 2, b=2, n=256)
    from kvtuner.kernels.decode_kernel import split_kernel

    params = inspect.signature(split_kernel.fn).parameters
    launch_only = {"num_warps", "num_stages", "maxnreg"}
    # positional arguments first, then every remaining kernel parameter by name, each exactly once
    assert set(kwargs) - launch_only == set(list(params)[len(args):])
    assert (kwargs["KW0"], kwargs["VW0"], kwargs["BLOCK_N"], kwargs["D"]) == (4, 2, 128, 128)
    assert kwargs["ASM"] is True  # the launch as on a GPU (PTX unpacking), not the interpreter's


def _offline_sm90(code: str):
    """Run ``code`` (``compile_offline`` imported as ``co``) in a subprocess without Triton's interpreter, so
    the kernel compiles for an H100 (sm_90) with Triton's bundled ptxas as on the GPU; the JSON it prints last."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    head = "import json, sys; sys.path.insert(0, 'benchmarks'); import compile_offline as co\n"
    out = subprocess.run([sys.executable, "-c", head + code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pair", ["33", "43", "23"])
def test_three_bit_values_along_head_dim_use_wide_shared_stores(pair):
    """3-bit values packed along head_dim (KIVI G = 32) are transposed through shared memory for the
    ``V^T P^T`` MMA. With a whole token row per thread Triton stored that tile one fp16 at a time
    (128 ``STS.U16`` per tile; H200, 64 x 4k: KV3 262.5 vs 243.4 µs, K2V3 248.4 vs 219.6 with four units
    per thread). Compiled offline for sm_90 (:func:`_offline_sm90`)."""
    result = _offline_sm90(
        f"a, kw = co.launch_args({pair[0]}, {pair[1]}, b=2, n=256, kv_group=32)\n"
        "_, ops, usage = co.sass_summary(co.compile_sm90(a, kw))\n"
        "print(json.dumps({'ops': ops, 'usage': usage}))\n")
    ops = result["ops"]
    assert sum(ops.values()) > 1000, result["usage"]  # a real kernel was disassembled
    assert ops.get("STS.U16", 0) == 0, (ops.get("STS.U16"), result["usage"])


@pytest.mark.parametrize("pair,words", [("32", "key_words"), ("43", "value_words")])
def test_contiguous_three_bit_codes_shorten_the_token_loop(pair, words):
    """3-bit keys, and values packed along head_dim, as contiguous words (``quant.to_channel_words``,
    ``KernelPolicy.words3``) unpack with half the instructions of the two planes (timed on an H100, 64 x 4k: K3V2
    222.7 -> 219.0 µs, K4V3 212.2 -> 206.9; docs/kernels.md). KIVI G = 32, compiled offline for sm_90
    (:func:`_offline_sm90`); the value tile keeps its wide shared stores (no ``STS.U16``)."""
    result = _offline_sm90(
        "out = {}\n"
        "for on in (False, True):\n"
        f"    a, kw = co.launch_args({pair[0]}, {pair[1]}, b=2, n=256, kv_group=32, {words}=on)\n"
        "    sass, ops, usage = co.sass_summary(co.compile_sm90(a, kw))\n"
        "    out[str(on)] = (sum(co.main_loop(sass).values()), usage, ops.get('STS.U16', 0))\n"
        "print(json.dumps(out))\n")
    (planes, planes_usage, _), (worded, usage, narrow) = result.values()
    assert planes > 1000, planes_usage  # a real token loop was found
    assert worded < 0.95 * planes, (worded, planes, usage, planes_usage)
    stack = lambda u: int(u.split("STACK:")[1].split()[0])  # noqa: E731
    assert stack(usage) <= stack(planes_usage) and narrow == 0, (usage, planes_usage, narrow)
