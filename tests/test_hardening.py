"""Bad input and faults never reach memory, give a silently wrong result or leave debris: in-kernel
bounds on every backend whatever the switches say, a per-thread check setting, device and overlap
checks before any kernel or fake runs, finite hyperparameters, hostile adapter files, interrupted
saves. (The randomized sweep over all of it: ``test_fuzz.py``.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from conftest import DEVICE_BACKENDS
from torch import nn

import sara_kernels
import sara_kernels as sk_top
from sara_kernels import ops as sk
from sara_kernels.adapter import AdapterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 37


def guarded(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` as a view into the middle of a larger buffer whose ends hold random guard values:
    (the view, the buffer)."""
    n = values.numel()
    if values.is_floating_point():
        buffer = torch.randn(n + 2 * PAD, dtype=torch.float64).to(values.dtype).to(values.device)
    else:
        buffer = torch.randint(-(2**20), 2**20, (n + 2 * PAD,), dtype=values.dtype, device=values.device)
    buffer[PAD : PAD + n] = values.reshape(-1)
    return buffer[PAD : PAD + n].view(values.shape), buffer


def guards(buffer: torch.Tensor) -> torch.Tensor:
    return torch.cat([buffer[:PAD], buffer[-PAD:]]).clone()


def adam_tensors(device="cpu", k=6, shape=(5, 7)):
    torch.manual_seed(3)
    weight = torch.randn(shape, device=device)
    index = torch.randperm(weight.numel(), device=device)[:k].sort().values.to(torch.int32)
    base = weight.view(-1)[index.long()].clone()
    delta, grad = torch.randn(k, device=device) * 1e-2, torch.randn(k, device=device)
    exp_avg, exp_avg_sq = torch.randn(k, device=device) * 1e-2, torch.rand(k, device=device) * 1e-3
    return [weight, index, base, delta, grad, exp_avg, exp_avg_sq]


HYPER = dict(step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


# ---------------------------------------------------------------------------------------------
# 1 + 11. No backend writes (or reads) outside its tensors, whatever the checks say
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bad", ["numel", "far", "negative"])
@pytest.mark.parametrize("op", ["scatter_merge_", "restore_", "sparse_adamw_"])
def test_bad_indices_never_write_outside_the_weight_with_checks_off(device, backend, bad, op):
    weight, buffer = guarded(torch.randn(5, 7, device=device))
    numel = weight.numel()
    index = torch.tensor([1, 4, numel + {"numel": 0, "far": 10**9, "negative": 0}[bad]], dtype=torch.int32)
    if bad == "negative":
        index = torch.tensor([-1, 4, 9], dtype=torch.int32)
    index = index.to(device)
    tensors = adam_tensors(device, k=3)
    before, weight_before = guards(buffer), weight.clone()
    with sara_kernels.use_backend(backend), sara_kernels.index_checks(False):
        try:
            if op == "scatter_merge_":
                sk.scatter_merge_(weight, index, tensors[2], tensors[3])
            elif op == "restore_":
                sk.restore_(weight, index, tensors[2])
            else:
                sk.sparse_adamw_(weight, index, *tensors[2:], **HYPER)
        except (IndexError, RuntimeError) as error:  # the reference and native CPU backends refuse
            assert "index" in str(error)
    assert torch.equal(guards(buffer), before)  # nothing written outside the weight
    if backend == "reference":  # range-checked before anything: the weight is untouched too
        assert torch.equal(weight, weight_before)


def test_triton_kernels_mask_bad_indices_in_the_fast_path():
    """The paths that skip the Python checks (SparseAdamW's, the layers' backward) hand layer
    tensors straight to the backend: a corrupted sparse_index writes nothing outside the weight."""
    triton = pytest.importorskip("triton")
    assert triton is not None
    from sara_kernels import _backend

    if not _backend.triton_available("cpu"):
        pytest.skip("the Triton backend does not run here")
    weight, buffer = guarded(torch.randn(6, 6))
    layer = nn.Linear(6, 6, bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer = sk_top.SparseDeltaLinear.from_dense(layer, index=torch.tensor([0, 7, 20], dtype=torch.int32))
    opt = sk_top.SparseAdamW([layer.sparse_delta], lr=1e-2)
    with sara_kernels.use_backend("triton"):
        layer(torch.randn(2, 6)).sum().backward()
        layer.sparse_index.data[2] = 36  # one past the end, invisible to the version counter
        before = guards(buffer)
        opt.step()
        assert torch.equal(guards(buffer), before)


@pytest.mark.parametrize("variant", ["direct", "gemm"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sampled_gradients_with_bad_indices_read_nothing_outside(device, backend, variant):
    """With checks off, an index outside the weight either raises or gives 0 there: it never reads
    outside the inputs (a far index used to segfault)."""
    if backend == "reference" and variant == "direct":
        pytest.skip("the reference has one algorithm")
    g, x = torch.randn(4, 5, device=device), torch.randn(4, 3, device=device)
    index = torch.tensor([1, 7, 10**9], dtype=torch.int64, device=device)
    variants = (
        sara_kernels.use_grad_variant(variant)
        if backend != "reference"
        else sara_kernels.use_grad_variant("auto")
    )
    with sara_kernels.use_backend(backend), sara_kernels.index_checks(False), variants:
        try:
            out = sk.sampled_weight_grad_linear(g, x, index, 5, 3)
        except (IndexError, RuntimeError) as error:
            assert "index" in str(error)
        else:
            want = (g.t() @ x).reshape(-1)
            torch.testing.assert_close(out[:2], want[index[:2]])
            assert out[2] == 0


def test_reference_backend_refuses_a_negative_index_with_checks_off():
    weight = torch.randn(3, 3)
    before = weight.clone()
    with sara_kernels.use_backend("reference"), sara_kernels.index_checks(False):
        with pytest.raises(IndexError, match=r"index holds values in \[-1, 4\]"):
            sk.scatter_merge_(weight, torch.tensor([-1, 4]), torch.zeros(2), torch.ones(2))
    assert torch.equal(weight, before)  # the last entry was not written through the wrap


# ---------------------------------------------------------------------------------------------
# 2. A validation cache that went stale
# ---------------------------------------------------------------------------------------------
def test_an_index_changed_behind_the_version_counter_writes_nothing_on_the_reference_backend():
    tensors = adam_tensors()
    weight, index = tensors[0], tensors[1]
    sara_kernels._checks.mark_index_checked(index, weight.numel())
    index.data[-1] = weight.numel() + 5  # .data writes do not bump the version counter
    state = [t.clone() for t in tensors]
    with sara_kernels.use_backend("reference"):
        with pytest.raises(IndexError):
            sk.sparse_adamw_(*tensors, **HYPER)
    for t, before in zip(tensors, state, strict=True):
        assert torch.equal(t, before)  # not even the delta or the moments moved


# ---------------------------------------------------------------------------------------------
# 3. The check setting is per thread
# ---------------------------------------------------------------------------------------------
def test_index_checks_off_in_one_thread_leave_other_threads_checked():
    inside, release = threading.Event(), threading.Event()

    def worker():
        with sara_kernels.index_checks(False):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    try:
        assert sara_kernels._checks.index_checks_enabled()
        with pytest.raises(ValueError, match="strictly increasing"):
            sk.scatter_merge_(torch.zeros(9), torch.tensor([3, 1]), torch.zeros(2), torch.zeros(2))
    finally:
        release.set()
        thread.join()
    previous = sara_kernels.set_index_checks(False)
    assert previous is True and not sara_kernels._checks.index_checks_enabled()
    sara_kernels.set_index_checks(previous)


# ---------------------------------------------------------------------------------------------
# 4. Meta tensors mixed with real ones
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_a_meta_tensor_among_cpu_tensors_is_an_error_for_every_op(position):
    tensors = adam_tensors()
    tensors[position] = tensors[position].to("meta")
    names = ("weight", "index", "base", "delta")
    with pytest.raises(RuntimeError, match=f"{names[position]} is on meta|but {names[position]} is on meta"):
        sk.scatter_merge_(*tensors[:4])
    with pytest.raises(RuntimeError, match="meta"):
        sk.sparse_adamw_(*tensors, **HYPER)
    if position != 3:
        with pytest.raises(RuntimeError, match="meta"):
            sk.restore_(*tensors[:3])
    with pytest.raises(RuntimeError, match="x is on meta"):
        index = torch.tensor([1, 3], dtype=torch.int32)
        sk.sampled_weight_grad_linear(torch.randn(2, 5), torch.randn(2, 7, device="meta"), index, 5, 7)
    meta = [t.to("meta") for t in adam_tensors()]
    sk.sparse_adamw_(*meta, **HYPER)  # all on meta: shape propagation, allowed


# ---------------------------------------------------------------------------------------------
# 5. Written tensors that share memory with another argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_overlapping_written_tensors_are_refused_before_anything_is_written(device, backend):
    tensors = adam_tensors(device)
    state = [t.clone() for t in tensors]
    weight, index, base, delta, grad, exp_avg, exp_avg_sq = tensors
    storage = torch.zeros(20, device=device)
    cases = [
        ((weight, index, base, delta, grad, delta, exp_avg_sq), "exp_avg and delta"),  # delta is exp_avg
        ((weight, index, base, storage[:6], grad, storage[3:9], exp_avg_sq), "exp_avg and delta"),  # partial
        ((weight, index, base, delta, delta, exp_avg, exp_avg_sq), "grad and delta"),
        ((weight, index, weight.view(-1)[:6], delta, grad, exp_avg, exp_avg_sq), "base and weight"),
    ]
    with sara_kernels.use_backend(backend):
        for args, names in cases:
            with pytest.raises(ValueError, match=f"{names} share memory"):
                sk.sparse_adamw_(*args, **HYPER)
        flat = torch.randn(64, device=device)
        views = [flat[0:35].view(5, 7), flat[20:55].view(5, 7)]  # two views of one weight, overlapping
        sets = [adam_tensors(device) for _ in range(2)]
        for s, view in zip(sets, views, strict=True):
            s[0] = view
        columns = [[s[j] for s in sets] for j in range(7)]
        with pytest.raises(ValueError, match=r"weights\[1\] and weights\[0\] share memory"):
            sk.sparse_adamw_multi_(
                *columns, steps=[1.0, 1.0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0
            )
        with pytest.raises(ValueError, match="weight and delta share memory|delta and weight share memory"):
            w = torch.randn(12, device=device)
            sk.scatter_merge_(w, torch.tensor([0, 1], device=device), torch.zeros(2, device=device), w[4:6])
    for t, before in zip(tensors, state, strict=True):
        assert torch.equal(t, before)


# ---------------------------------------------------------------------------------------------
# 6. NaN and infinite hyperparameters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay", "step", "beta1"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyperparameters_are_refused(device, backend, name, value):
    tensors = adam_tensors(device)
    state = [t.clone() for t in tensors]
    with sara_kernels.use_backend(backend):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            sk.sparse_adamw_(*tensors, **{**HYPER, name: value})
    for t, before in zip(tensors, state, strict=True):
        assert torch.equal(t, before)


def test_sparse_adamw_checks_param_groups_on_every_step():
    layer = sk_top.SparseDeltaLinear.from_dense(nn.Linear(4, 4), k=5)
    opt = sk_top.SparseAdamW([layer.sparse_delta], lr=1e-3)
    layer(torch.randn(2, 4)).sum().backward()
    weight = layer.weight.clone()
    for key, value in (("lr", float("nan")), ("eps", float("inf")), ("weight_decay", float("nan"))):
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError, match=rf"param_groups\[0\]\): {key} must be finite"):
            opt.step()
        opt.param_groups[0][key] = good
    opt.param_groups[0]["betas"] = (0.9, float("nan"))
    with pytest.raises(ValueError, match="beta2 must be finite"):
        opt.step()
    assert torch.equal(layer.weight, weight) and not layer.sparse_delta.any()
    with pytest.raises(ValueError, match="lr must be finite"):
        sk_top.SparseAdamW([layer.sparse_delta], lr=float("nan"))


# ---------------------------------------------------------------------------------------------
# 7 + 8. Hostile adapter files
# ---------------------------------------------------------------------------------------------
def _adapter(tmp_path, delta=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    sk_top.apply_sara(model, sk_top.SaRAConfig(fraction=0.3))
    with torch.no_grad():
        model[0].sparse_delta.copy_(torch.randn(model[0].k) * 1e-2 if delta is None else delta)
    path = tmp_path / "adapter.safetensors"
    sk_top.save_adapter(model, path)
    torch.manual_seed(0)
    return path, nn.Sequential(nn.Linear(6, 6))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_adapter_with_non_finite_deltas_is_refused_unless_allowed(tmp_path, value):
    torch.manual_seed(0)
    probe = sk_top.apply_sara(nn.Sequential(nn.Linear(6, 6)), sk_top.SaRAConfig(fraction=0.3))
    delta = torch.full((probe[0].k,), 1e-3)
    delta[1] = value
    path, base = _adapter(tmp_path, delta)
    weight = base[0].weight.clone()
    with pytest.raises(AdapterError, match="1 of the .* deltas are NaN or infinite"):
        sk_top.load_adapter(base, path)
    assert type(base[0]) is nn.Linear and torch.equal(base[0].weight, weight)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        sk_top.read_adapter(path)
    sk_top.read_adapter(path, allow_nonfinite=True)
    sk_top.load_adapter(base, path, allow_nonfinite=True)
    assert not bool(torch.isfinite(base[0].weight).all())


_LOAD_FIFO = textwrap.dedent(
    """
    import sys
    from torch import nn
    import sara_kernels as sk
    try:
        sk.load_adapter(nn.Sequential(nn.Linear(2, 2)), sys.argv[1])
    except sk.adapter.AdapterError as error:
        print(error)
    """
)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_FIFO, str(fifo)], capture_output=True, text=True, env=env, timeout=45
        )
    except subprocess.TimeoutExpired:
        pytest.fail("load_adapter blocked on a FIFO")
    assert "not a regular file" in proc.stdout, proc.stderr[-2000:]


def _rewrite_metadata(path, change):
    """Rewrite an adapter file's metadata (the tensors stay)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {key: f.get_tensor(key) for key in f.keys()}
    change(metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_deeply_nested_metadata_is_an_adapter_error(tmp_path):
    path, base = _adapter(tmp_path)

    def nest(metadata):
        metadata["layer/0"] = "[" * 100_000 + "]" * 100_000

    _rewrite_metadata(path, nest)
    with pytest.raises(AdapterError, match="nested too deeply|bad layer metadata"):
        sk_top.load_adapter(base, path)


def test_a_huge_module_name_is_shortened_in_messages(tmp_path):
    path, base = _adapter(tmp_path)
    name = "x" * 1_000_000

    def rename(metadata):
        metadata["layers"] = json.dumps([name])
        metadata[f"layer/{name}"] = metadata.pop("layer/0")

    _rewrite_metadata(path, rename)
    with pytest.raises(AdapterError) as info:
        sk_top.load_adapter(base, path)
    assert len(str(info.value)) < 2000 and "1000000 characters" in str(info.value)


# ---------------------------------------------------------------------------------------------
# 9. An interrupted save leaves nothing behind
# ---------------------------------------------------------------------------------------------
_KILLED_SAVE = textwrap.dedent(
    """
    import time, sys, torch
    from torch import nn
    import safetensors.torch
    import sara_kernels as sk
    real = safetensors.torch.save_file
    def slow(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("written", flush=True)
        time.sleep(600)  # killed here: the temporary file is complete, not yet renamed
    safetensors.torch.save_file = slow
    torch.manual_seed(0)
    model = sk.apply_sara(nn.Sequential(nn.Linear(64, 64)), sk.SaRAConfig(fraction=0.2))
    sk.save_adapter(model, sys.argv[1])
    """
)


def test_a_save_killed_with_sigkill_leaves_nothing_the_next_save_does_not_remove(tmp_path):
    path = tmp_path / "adapter.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seen = set()
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "written"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # kill -9 leaves this save's temporary file; the save it interrupted removed the earlier ones
        leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        assert len(leftovers) == 1 and leftovers[0] not in seen and not path.exists()
        seen.add(leftovers[0])
    torch.manual_seed(0)
    model = sk_top.apply_sara(nn.Sequential(nn.Linear(64, 64)), sk_top.SaRAConfig(fraction=0.2))
    sk_top.save_adapter(model, path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]
    # A live writer's temporary file (this process) is never removed.
    mine = tmp_path / f".adapter.safetensors.{os.getpid()}@{socket.gethostname()}.abc.tmp"
    mine.write_bytes(b"in progress")
    sk_top.save_adapter(model, path)
    assert mine.exists()


# ---------------------------------------------------------------------------------------------
# 10. ProgressiveReselection arguments that could never fire
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(at=True, total_steps=10), "'at' must be a positive step number, got True"),
        (dict(at=11, total_steps=10), "at=11 lies beyond total_steps=10"),
        (dict(at=0.5, total_steps=True), "total_steps must be a positive step number"),
        (dict(at=0.5), "total_steps is needed"),
    ],
)
def test_progressive_reselection_refuses_a_schedule_that_never_fires(kwargs, words):
    torch.manual_seed(0)
    model = sk_top.apply_sara(nn.Sequential(nn.Linear(8, 8)), sk_top.SaRAConfig(fraction=0.2))
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sk_top.ProgressiveReselection(model, None, **kwargs)


def test_ops_accept_inference_tensors():
    """Tensors made under torch.inference_mode have no version counter; the remembered-check cache
    must not read one (it raised RuntimeError before)."""
    weight = torch.randn(7, 9)
    base = weight.reshape(-1)[[1, 4, 20, 62]].clone()
    with torch.inference_mode():
        index = torch.tensor([1, 4, 20, 62], dtype=torch.int32)
        delta = torch.randn(4)
        sk.scatter_merge_(weight, index, base, delta)
        assert torch.equal(weight.reshape(-1)[index.long()], base + delta)
        sk.restore_(weight, index, base)
        assert torch.equal(weight.reshape(-1)[index.long()], base)
        bad = torch.tensor([4, 1], dtype=torch.int32)
        with pytest.raises(ValueError, match="strictly increasing"):
            sk.restore_(weight, bad, base[:2])
