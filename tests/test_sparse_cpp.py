"""loom's compiled block-sparse kernel (loom.native, loom.model.block_sparse_cpp): equal to dense
attention under the layout's mask, forward and backward, on every path through its threads; the
model runs it where it builds and falls back, saying so, where it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SPARSE_LAYOUTS, tiny_overrides

from loom import native
from loom.config import load_config
from loom.errors import LoomError
from loom.model import block_sparse_cpp, sparse_layout
from loom.model.block_sparse import dense_mask
from loom.model.block_sparse_cpp import KERNEL, KeptBlocks, cpp_block_sparse_attention
from loom.model.transformer import Transformer
from loom.parallel import host_allocator
from loom.sparsity import SparsityConfig, make_layout

LAYOUTS = [
    *SPARSE_LAYOUTS,
    {"mode": "variable", "local_window_blocks": [1, 2], "global_block_indices": [1], "num_random_blocks": 1},
]


@pytest.fixture(autouse=True)
def _threads():  # noqa: ANN202
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _layout(t: torch.Tensor) -> list[int]:
    """The strides that place ``t``'s elements (those of dimensions longer than 1)."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


def _check(  # noqa: PLR0913
    layout: torch.Tensor,
    block: int,
    batch: int,
    d: int,
    causal: bool = True,
    dtype=torch.float32,  # noqa: ANN001
    token_major: bool = False,
) -> None:
    """The kernel against float64 dense attention under the layout's element mask: outputs and
    the gradients of q, k and v (fp32: 2e-5; bf16: the 16-bit tolerance). ``token_major``: q, k,
    v and the output's gradient are (batch, S, heads, d) in memory, as the model's projections
    give them. Each gradient comes back in its input's layout, the output in q's."""
    heads, n = layout.shape[0], layout.shape[1]
    shape = (batch, block * n, heads, d) if token_major else (batch, heads, block * n, d)
    as_bhsd = (lambda t: t.transpose(1, 2)) if token_major else (lambda t: t)  # noqa: E731
    q, k, v, grad = (as_bhsd(torch.randn(shape, dtype=torch.float64)) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = dense_mask(layout, block, causal)
    want = F.scaled_dot_product_attention(*ref, attn_mask=mask.unsqueeze(0))
    want.backward(grad)
    mine = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    got = cpp_block_sparse_attention(*mine, KeptBlocks.of(layout, block), causal=causal)
    got.backward(grad.to(dtype))
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    assert got.dtype == dtype
    assert _layout(got) == _layout(mine[0])
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b, name in zip(mine, ref, "qkv"):
        assert a.grad.dtype == dtype
        assert _layout(a.grad) == _layout(a), f"d{name} laid out as {name}"
        torch.testing.assert_close(a.grad.double(), b.grad, **tol, msg=f"d{name}")


@pytest.mark.parametrize("params", LAYOUTS, ids=lambda p: p["mode"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_equals_dense_attention_under_the_mask(params: dict, threads: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    block, n = 8, 7
    _check(make_layout(SparsityConfig(block=block, **params), 3, block * n), block, batch=2, d=16)


@pytest.mark.parametrize("heads", [3, 1], ids=["heads on threads", "rows split"])
def test_token_major_inputs_are_read_in_place_and_their_gradients_written_so(heads: int) -> None:
    """q, k, v (batch, S, heads, d) in memory, as the model's projections give them: read through
    their strides, the output and gradients written in that layout, on each thread path."""
    torch.manual_seed(6)
    torch.set_num_threads(2)
    params = {"mode": "bigbird", "different_layout_per_head": True, "num_random_blocks": 1}
    batch = 2 if heads > 1 else 1
    _check(make_layout(SparsityConfig(block=8, **params), heads, 8 * 6), 8, batch=batch, d=16, token_major=True)


def test_overlapping_rows_are_copied_before_the_kernel_reads_them() -> None:
    """A gradient expanded from one token (token stride 0, as a broadcast loss gives) is not a
    matrix BLAS can read in place: it is copied, and the gradients equal dense attention's."""
    torch.manual_seed(8)
    block, n, heads, d = 8, 6, 2, 8
    layout = make_layout(SparsityConfig(block=block, mode="bigbird", num_random_blocks=1), heads, block * n)
    mine = [torch.randn(1, heads, block * n, d, requires_grad=True) for _ in range(3)]
    ref = [t.detach().clone().requires_grad_() for t in mine]
    grad = torch.randn(1, heads, 1, d).expand(1, heads, block * n, d)
    cpp_block_sparse_attention(*mine, KeptBlocks.of(layout, block)).backward(grad)
    F.scaled_dot_product_attention(*ref, attn_mask=dense_mask(layout, block).unsqueeze(0)).backward(grad)
    for a, b, name in zip(mine, ref, "qkv"):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-5, msg=f"d{name}")


@pytest.mark.parametrize("params", LAYOUTS[1:4], ids=lambda p: p["mode"])
def test_fewer_heads_than_threads_split_the_rows_and_sum_private_key_gradients(params: dict) -> None:
    """One batch x head on two threads: the rows of one head go to both, each adding into its own
    dK and dV, summed at the end (with more pairs, each thread owns whole heads)."""
    torch.manual_seed(1)
    torch.set_num_threads(2)
    block, n = 16, 9
    _check(make_layout(SparsityConfig(block=block, **params), 1, block * n), block, batch=1, d=32)


@pytest.mark.parametrize(
    ("heads", "causal"), [(3, True), (3, False), (1, True)], ids=["causal", "bidirectional", "rows split"]
)
def test_gradients_are_written_whatever_their_memory_held(heads: int, causal: bool, monkeypatch) -> None:  # noqa: ANN001
    """dK and dV are added to block by block, over memory the kernel clears first: memory full of
    NaN (as a reused block may hold garbage) changes nothing, on each path through the threads."""
    torch.manual_seed(5)
    torch.set_num_threads(2)

    def nan_filled(t: torch.Tensor) -> None:  # every output's memory, as the kernel receives it
        t.fill_(float("nan"))

    monkeypatch.setattr(block_sparse_cpp, "fresh_pages", nan_filled)
    attention = "unidirectional" if causal else "bidirectional"
    params = {"mode": "bigbird", "different_layout_per_head": True, "num_random_blocks": 1, "attention": attention}
    _check(
        make_layout(SparsityConfig(block=8, **params), heads, 8 * 6), 8, batch=3 if heads > 1 else 1, d=8, causal=causal
    )


@pytest.mark.skipif(not host_allocator.THP_MODE.exists(), reason="no transparent huge pages here")
def test_outputs_faulted_in_by_the_kernels_threads_hold_the_same_results(monkeypatch) -> None:  # noqa: ANN001
    """Outputs large enough to be populated (16 MiB each here, fresh mappings under loom's host
    allocator) are faulted in by the kernel's threads before they write them: bit for bit the
    results of the same call writing into memory that faults page by page."""
    torch.manual_seed(7)
    torch.set_num_threads(2)
    host_allocator.fix_mmap_threshold()  # as loom train and the Trainer do
    layout = make_layout(SparsityConfig(block=64, mode="bslongformer", num_sliding_window_blocks=3), 4, 16384)
    kept = KeptBlocks.of(layout, 64)
    q, k, v, grad = (torch.randn(1, 4, 16384, 64) for _ in range(4))
    found = []

    def run() -> list[torch.Tensor]:
        mine = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cpp_block_sparse_attention(*mine, kept)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in mine)]

    def counted(t: torch.Tensor) -> tuple[int, int] | None:
        found.append(host_allocator.fresh_pages(t))
        return found[-1]

    monkeypatch.setattr(block_sparse_cpp, "fresh_pages", counted)
    populated = run()
    if host_allocator.THP_MODE.read_text().count("[never]") == 0:
        assert len(found) == 4 and all(found), found  # out, then dq, dk, dv: each a fresh mapping
    monkeypatch.setattr(block_sparse_cpp, "fresh_pages", lambda t: None)
    for a, b in zip(populated, run(), strict=True):
        assert torch.equal(a, b)


def test_a_bidirectional_layout_attends_the_blocks_after_the_diagonal_too() -> None:
    torch.manual_seed(2)
    block, n = 8, 6
    params = {"mode": "longformer", "attention": "bidirectional", "global_block_indices": [2]}
    layout = make_layout(SparsityConfig(block=block, **params), 2, block * n)
    assert layout.triu(1).any()
    _check(layout, block, batch=2, d=8, causal=False)


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16() -> None:
    torch.manual_seed(3)
    block, n = 16, 8
    layout = make_layout(SparsityConfig(block=block, mode="bigbird", num_random_blocks=1), 2, block * n)
    _check(layout, block, batch=1, d=32, dtype=torch.bfloat16)
    _check(layout, block, batch=1, d=32, dtype=torch.bfloat16, token_major=True)


def test_views_into_one_projection_and_blocks_of_64() -> None:
    """q, k, v as views into one fused projection's output (strided, not contiguous); the block
    size the benchmarks run."""
    torch.manual_seed(4)
    block, n, heads, d = 64, 5, 2, 16
    layout = make_layout(SparsityConfig(block=block, mode="fixed", num_local_blocks=2), heads, block * n)
    qkv = torch.randn(1, block * n, 3, heads, d, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    got = cpp_block_sparse_attention(q, k, v, KeptBlocks.of(layout, block))
    ref = qkv.detach().clone().requires_grad_()
    want = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in ref.unbind(2)), attn_mask=dense_mask(layout, block).unsqueeze(0)
    )
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(qkv.grad, ref.grad, rtol=2e-5, atol=2e-5)


def test_kept_blocks_list_each_rows_blocks_ascending_with_its_own() -> None:
    layout = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout[0, 3, 0] = layout[0, 2, 1] = True  # rows without their diagonal: the kernel adds it
    kept = KeptBlocks.of(layout, 8)
    assert kept.cols.dtype == torch.int32
    assert kept.cols[0].tolist() == [[0, -1], [1, -1], [1, 2], [0, 3]]


def test_wrong_shapes_are_refused() -> None:
    kept = KeptBlocks.of(torch.ones(2, 4, 4, dtype=torch.bool).tril(), 8)
    q = torch.randn(1, 2, 24, 8)
    with pytest.raises(ValueError, match="2 heads x 4 blocks of 8"):
        cpp_block_sparse_attention(q, q, q, kept)


def test_the_callers_blas_threads_are_left_as_they_were() -> None:
    """The kernel's threads multiply with one BLAS thread each; the caller's own setting (MKL's is
    per thread) is put back, so torch's matmuls after it keep their threads."""
    local = getattr(native._torch_library(), "MKL_Set_Num_Threads_Local", None)
    if local is None:
        pytest.skip("torch's BLAS here is not MKL")

    def setting() -> int:  # this thread's own setting (setting it returns the one before: put it back)
        now = local(0)
        local(now)
        return now

    torch.set_num_threads(2)
    before = setting()
    layout = make_layout(SparsityConfig(block=16, mode="bigbird"), 1, 64)
    q = torch.randn(1, 1, 64, 16, requires_grad=True)
    cpp_block_sparse_attention(q, q, q, KeptBlocks.of(layout, 16)).sum().backward()  # 1 head, 2 threads: both paths
    assert setting() == before != 1


# ----------------------------------------------------------------------------- building


def test_the_build_is_cached_by_source_and_written_atomically(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    built = native._build(KERNEL, native.compiler())
    assert built.parent == tmp_path / "native" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert native._build(KERNEL, native.compiler()) == built and built.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary file left behind


def test_a_source_that_does_not_compile_says_why(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    with pytest.raises(native.NativeUnavailable, match="building loom's broken kernel failed") as failed:
        native._build("broken", native.compiler())
    assert "compiler" in failed.value.fix
    assert not list((tmp_path / "cache" / "native").iterdir())  # nothing half-written kept


def _model_items(kernel: str) -> list[str]:
    items = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.vocab_size=64", "model.max_seq_len=64"]
    items.append("train.seq_len=64")
    return [
        *items,
        'model.attention="sparse"',
        "model.sparse_attention.block=8",
        f'model.sparse_attention.kernel="{kernel}"',
    ]


def _without_compiler(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    native._load.cache_clear()


def test_without_a_compiler_auto_falls_back_with_a_warning_and_cpp_refuses(monkeypatch) -> None:  # noqa: ANN001
    x = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    compiled = Transformer(load_config(None, _model_items("cpp")).model, seed=1).loss(x, x)
    _without_compiler(monkeypatch)
    try:
        assert not native.available(KERNEL)
        with pytest.warns(UserWarning, match="needs a C\\+\\+ compiler.*torch-ops kernel instead"):
            fallback = Transformer(load_config(None, _model_items("auto")).model, seed=1).loss(x, x)
        torch.testing.assert_close(fallback, compiled, rtol=1e-5, atol=1e-6)  # the same attention, the other kernel
        with pytest.raises(LoomError, match="needs a C\\+\\+ compiler") as refused:
            Transformer(load_config(None, _model_items("cpp")).model, seed=1)
        assert "set CXX" in refused.value.fix
    finally:
        native._load.cache_clear()


def test_loom_train_asking_for_the_cpp_kernel_stops_before_any_rank_without_a_compiler(
    tmp_path: Path,
    text_corpus: Path,
    monkeypatch,
    capsys,  # noqa: ANN001
) -> None:
    from loom.cli import main

    _without_compiler(monkeypatch)
    try:
        items = tiny_overrides(text_corpus, **{"model.attention": "sparse", "model.sparse_attention.kernel": "cpp"})
        sets = [arg for item in items for arg in ("--set", item)]
        assert main(["train", "--run-dir", str(tmp_path / "run"), "--nproc", "2", *sets]) == 2
        err = capsys.readouterr().err
        assert "needs a C++ compiler" in err and "set CXX" in err
        assert not (tmp_path / "run").exists()  # no rank started, nothing written
    finally:
        native._load.cache_clear()


@pytest.mark.parametrize("kernel", ["auto", "cpp", "torch"])
def test_the_model_runs_the_kernel_asked_for(kernel: str, monkeypatch) -> None:  # noqa: ANN001
    from loom.model import block_sparse, block_sparse_cpp

    ran = []
    for module, name in ((block_sparse_cpp, "cpp_block_sparse_attention"), (block_sparse, "block_sparse_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(sparse_layout, name, lambda *a, _r=real, _n=name, **k: ran.append(_n) or _r(*a, **k))
    model = Transformer(load_config(None, _model_items(kernel)).model, seed=1)
    x = torch.randint(0, 64, (1, 64))
    model.loss(x, x).backward()
    expected = "block_sparse_attention" if kernel == "torch" else "cpp_block_sparse_attention"
    assert ran == [expected] * 2  # both layers
