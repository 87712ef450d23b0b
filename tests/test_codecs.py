"""The EnCodec and Mimi converters (``vqtriton.codecs``) against the codecs' own quantizer modules.

The codecs' code runs here: ``encodec`` 0.1.1 and ``moshi`` 0.2.13, installed with ``pip install
--no-deps`` (their declared dependencies pin older torch releases). Their quantization modules import only
torch and einops, but the packages' ``__init__`` import much more (encodec's the model, and through it
torchaudio; moshi's its models and servers). So :func:`codec_module` loads just the quantization
subpackage from the installed files: an empty stand-in package ``_codec_<name>`` whose ``__path__`` is the
installed package's folder, so ``<name>/quantization/*.py`` (and encodec's ``distrib.py``, which
``core_vq`` imports) run unchanged and the package ``__init__`` never runs.

Test data: no weights can be downloaded, so each test builds the codec's quantizer with random
initialisation and trains it for a few steps (k-means init, EMA updates, dead-code replacement), then
compares in eval mode. The codecs assign in float32's expanded form (EnCodec) or ``torch.cdist`` (Mimi,
the same form past 25 rows), ours exactly: a code may differ only where two codes are closer than that
form's rounding error, and :func:`check_codes` asserts exactly that, level by level.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import vqtriton as vqt
from vqtriton.codecs import SplitResidualVQ, from_encodec, from_mimi

BACKENDS = ["torch", "triton"]


def codec_module(package: str, module: str):
    """``<package>.<module>`` from the installed files, without running ``<package>/__init__.py``."""
    spec = importlib.util.find_spec(package)  # a top-level spec: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed: pip install --no-deps (see this file's docstring)")
    name = f"_codec_{package}"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = stand_in
    return importlib.import_module(f"{name}.{module}")


encodec_vq = codec_module("encodec", "quantization.vq")
moshi_vq = codec_module("moshi", "quantization.vq")


def trained_encodec(dim=12, n_q=4, bins=37, steps=4, **kwargs):
    q = encodec_vq.ResidualVectorQuantizer(dimension=dim, n_q=n_q, bins=bins, kmeans_iters=5, **kwargs)
    q.train()
    for _ in range(steps):
        q(torch.randn(3, dim, 41), sample_rate=24000)
    return q.eval()


def trained_mimi(dim=10, channels=14, n_q=5, bins=29, steps=6):
    q = moshi_vq.SplitResidualVectorQuantizer(
        dimension=dim, input_dimension=channels, output_dimension=channels, n_q=n_q, bins=bins
    )
    q.train()
    for _ in range(steps):
        q(torch.randn(2, channels, 50), frame_rate=12)
    return q.eval()


def check_codes(rows: torch.Tensor, codebooks: list[torch.Tensor], ours: torch.Tensor, theirs: torch.Tensor) -> int:
    """Level by level on the residual rows ``[n, D]``: every code of ours is a certified nearest code, and
    ours and theirs are equal except where the residual's two nearest codes are within float32's error
    of the expanded form ``|r|^2 - 2 r.c + |c|^2`` (twice the bound, for two distances, and twice again for
    cdist's square root). A row that differed is left out of the later levels (its residuals differ).
    Returns the number of rows whose codes differ somewhere; asserts they are at most 1 %."""
    n, d = rows.shape
    residual, same = rows.float(), torch.ones(n, dtype=torch.bool)
    for l, c in enumerate(codebooks):
        c = c.detach().float()
        assert vqt.verify_assignment(residual, c, ours[:, l]).all()
        r64, c64 = residual.double(), c.double()
        dist = (r64[:, None] - c64[None]).square().sum(-1)
        top2 = dist.topk(2, dim=1, largest=False).values
        bound = 4 * (d + 2) * 2.0**-24 * (r64.norm(dim=1) + c64.norm(dim=1).max()) ** 2
        differ = same & (ours[:, l] != theirs[:, l])
        assert (top2[differ, 1] - top2[differ, 0] <= bound[differ]).all(), f"level {l}: codes differ off a near-tie"
        same &= ~differ
        residual = residual - c[ours[:, l]]
    assert (~same).sum() <= n // 100
    return int((~same).sum())


class Holder(nn.Module):
    """A larger model around the codec's quantizer, for state_dicts with a prefix."""

    def __init__(self, quantizer):
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.quantizer = quantizer


# --- EnCodec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_encodec_codes_and_outputs(backend):
    q = trained_encodec()
    x = torch.randn(3, 12, 41)
    with torch.no_grad():
        codes = q.encode(x, 24000)  # [L, B, T]
        theirs = q(x, 24000)
    for rvq in (from_encodec(q, backend=backend), from_encodec(Holder(q).state_dict(), backend=backend)):
        assert isinstance(rvq, vqt.ResidualVQ) and rvq.num_quantizers == 4
        rvq.eval()
        z_q, idx, _ = rvq(x)
        assert idx.shape == (3, 41, 4) and z_q.shape == x.shape
        codebooks = [layer.codebook for layer in rvq.layers]
        for layer, level in zip(rvq.layers, q.vq.layers):
            assert torch.equal(layer.codebook, level._codebook.embed)
            assert torch.equal(layer.cluster_size, level._codebook.cluster_size)
            assert torch.equal(layer.embed_sum, level._codebook.embed_avg)
        rows = x.transpose(1, 2).reshape(-1, 12)
        differ = check_codes(rows, codebooks, idx.reshape(-1, 4), codes.permute(1, 2, 0).reshape(-1, 4))
        if differ == 0:
            assert torch.equal(idx.permute(2, 0, 1), codes)
            torch.testing.assert_close(z_q, theirs.quantized, rtol=0, atol=0)
            torch.testing.assert_close(rvq.decode(idx), q.decode(codes), rtol=0, atol=0)


def test_encodec_settings_bandwidth_and_training_step():
    q = trained_encodec(n_q=3, decay=0.9, threshold_ema_dead_code=0)
    rvq = from_encodec(q, backend="torch")
    layer = rvq.layers[0]
    assert (layer.ema_decay, layer.eps, layer.beta, layer.dead_code_threshold, layer.channel_dim) == (0.9, 1e-5, 1.0, 0.0, 1)
    assert from_encodec(q, num_quantizers=2).num_quantizers == 2  # EnCodec's lower bandwidths: the first levels
    x = torch.randn(3, 12, 41)
    torch.testing.assert_close(rvq.eval()(x)[1][..., :2], from_encodec(q, num_quantizers=2).eval()(x)[1])
    # One training step each, on the same batch: the same EMA update (EnCodec's rule is ours).
    q.train(), rvq.train()
    theirs = q(x, 24000)
    z_q, idx, loss = rvq(x)
    assert torch.equal(idx.permute(2, 0, 1), theirs.codes)
    torch.testing.assert_close(z_q, theirs.quantized)
    torch.testing.assert_close(loss / 3, theirs.penalty)  # their penalty is the mean of the levels' losses
    for layer, level in zip(rvq.layers, q.vq.layers):
        torch.testing.assert_close(layer.cluster_size, level._codebook.cluster_size)
        torch.testing.assert_close(layer.embed_sum, level._codebook.embed_avg)
        torch.testing.assert_close(layer.codebook, level._codebook.embed)
    assert from_encodec(q, ema_decay=None).layers[0].ema_decay is None  # a learned codebook to fine-tune


def test_encodec_offset_data_ours_is_the_nearest():
    """Codes sharing a large offset: EnCodec's float32 expanded form loses the nearest code, ours keeps it."""
    q = encodec_vq.ResidualVectorQuantizer(dimension=8, n_q=1, bins=50, kmeans_init=False).eval()
    book = q.vq.layers[0]._codebook
    with torch.no_grad():
        book.embed.copy_(300 + torch.randn(50, 8))
    x = 300 + torch.randn(4, 8, 60)
    with torch.no_grad():
        theirs = q.encode(x, 24000)[0].reshape(-1)
    ours = from_encodec(q, backend="torch").eval()(x)[1].reshape(-1)
    rows = x.transpose(1, 2).reshape(-1, 8)
    assert vqt.verify_assignment(rows, book.embed, ours).all()
    differ = theirs != ours
    assert differ.any()  # the data does separate the two, else this test would check nothing
    d = lambda idx: (rows.double() - book.embed.double()[idx]).square().sum(1)  # noqa: E731
    assert (d(ours)[differ] < d(theirs)[differ]).all()


# --- Mimi --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mimi_codes_and_outputs(backend):
    q = trained_mimi()
    x = torch.randn(2, 14, 50)
    with torch.no_grad():
        codes = q.encode(x)  # [B, L, T]
        theirs = q(x, frame_rate=12)
    for split in (from_mimi(q, backend=backend), from_mimi(Holder(q).state_dict(), backend=backend)):
        assert isinstance(split, SplitResidualVQ) and [r.num_quantizers for r in split.rvqs] == [1, 4]
        split.eval()
        z_q, idx, _ = split(x)
        assert idx.shape == (2, 50, 5) and z_q.shape == (2, 14, 50)
        for part, rvq, theirs_part in zip(range(2), split.rvqs, (q.rvq_first, q.rvq_rest)):
            assert torch.equal(split.project_in[part].weight, theirs_part.input_proj.weight)
            assert torch.equal(split.project_out[part].weight, theirs_part.output_proj.weight)
            for layer, level in zip(rvq.layers, theirs_part.vq.layers):
                assert torch.equal(layer.codebook, level._codebook.embedding)
        # Each part quantizes its own projection of x: the same op as Mimi's, so the same bits.
        differ = 0
        for part, rvq, theirs_part in zip(range(2), split.rvqs, (q.rvq_first, q.rvq_rest)):
            with torch.no_grad():
                projected = theirs_part.input_proj(x)
            assert torch.equal(split.project_in[part](x), projected)
            levels = slice(0, 1) if part == 0 else slice(1, 5)
            rows = projected.transpose(1, 2).reshape(-1, 10)
            ours_codes = idx[..., levels].reshape(-1, rvq.num_quantizers)
            theirs_codes = codes[:, levels].transpose(1, 2).reshape(-1, rvq.num_quantizers)
            differ += check_codes(rows, [layer.codebook for layer in rvq.layers], ours_codes, theirs_codes)
        if differ == 0:
            assert torch.equal(idx.transpose(1, 2), codes)
            torch.testing.assert_close(z_q, theirs.x)
            torch.testing.assert_close(split.decode(idx), q.decode(codes))


def test_mimi_active_levels_single_part_and_settings():
    q = trained_mimi(n_q=6)
    q.set_num_codebooks(3)  # Mimi's bitrate choice: the module's active levels are converted
    split = from_mimi(q, backend="torch").eval()
    assert [r.num_quantizers for r in split.rvqs] == [1, 2] and split.num_quantizers == 3
    assert [r.num_quantizers for r in from_mimi(q.state_dict()).rvqs] == [1, 5]  # a state_dict: every level
    assert [r.num_quantizers for r in from_mimi(q, num_quantizers=1).rvqs] == [1]  # the semantic level only
    x = torch.randn(2, 14, 50)
    with torch.no_grad():
        codes = q.encode(x)
    _, idx, loss = split(x)
    assert torch.equal(idx.transpose(1, 2), codes) and loss.dim() == 0
    layer = split.rvqs[0].layers[0]
    assert (layer.ema_decay, layer.eps, layer.beta, layer.dead_code_threshold) == (0.99, 1e-5, 1.0, 0.0)
    # moshi's plain ResidualVectorQuantizer: one part, its projections (none: identity convolutions).
    for proj in ({"input_dimension": 9, "output_dimension": 11}, {}):
        plain = moshi_vq.ResidualVectorQuantizer(dimension=6, n_q=3, bins=17, **proj).train()
        for _ in range(3):
            plain(torch.randn(2, proj.get("input_dimension", 6), 30), frame_rate=12)
        plain.eval()
        one = from_mimi(plain, backend="torch").eval()
        y = torch.randn(2, proj.get("input_dimension", 6), 30)
        with torch.no_grad():
            ref = plain(y, 12)
        z_q, idx, _ = one(y)
        assert len(one.rvqs) == 1 and torch.equal(idx.transpose(1, 2), ref.codes)
        torch.testing.assert_close(z_q, ref.x)


# --- bad input ---------------------------------------------------------------------------------------


def test_checks():
    q = trained_encodec(n_q=2, steps=1)
    with pytest.raises(TypeError, match="state_dict"):
        from_encodec([1, 2])
    with pytest.raises(TypeError, match="EnCodec's ResidualVectorQuantizer"):
        from_encodec(Holder(q))  # a module holding one: pass its state_dict
    with pytest.raises(ValueError, match="no EnCodec quantizer"):
        from_encodec({"weight": torch.zeros(2)})
    two = nn.ModuleDict({"a": q, "b": trained_encodec(n_q=2, steps=1)}).state_dict()
    with pytest.raises(ValueError, match="several"):
        from_encodec(two)
    assert from_encodec(two, prefix="b.").num_quantizers == 2
    with pytest.raises(ValueError, match="no EnCodec quantizer under prefix"):
        from_encodec(two, prefix="c.")
    with pytest.raises(ValueError, match="at most the 2 levels"):
        from_encodec(q, num_quantizers=3)
    with pytest.raises(ValueError, match="never initialised"):
        from_encodec(encodec_vq.ResidualVectorQuantizer(dimension=4, n_q=2, bins=5))  # k-means pending
    with pytest.raises(ValueError, match="heads"):
        from_encodec(q, heads=2)
    state = q.state_dict()
    del state["vq.layers.0._codebook.embed"]
    with pytest.raises(ValueError, match="numbered"):
        from_encodec(state)
    with pytest.raises(ValueError, match="Mimi level 1 was never initialised"):
        from_mimi(trained_mimi(steps=1))  # each level starts its k-means one step after the level before
    m = trained_mimi()
    with pytest.raises(ValueError, match="num_quantizers must be >= 1"):
        from_mimi(m, num_quantizers=0)
    with pytest.raises(ValueError, match="at most the 5 levels"):
        from_mimi(m, num_quantizers=6)
    split = from_mimi(m)
    with pytest.raises(ValueError, match=r"x must be \[B, 14, T\]"):
        split(torch.randn(2, 13, 5))
    with pytest.raises(ValueError, match=r"indices must be \[B, T, 5\]"):
        split.decode(torch.zeros(2, 5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="channel-first"):
        SplitResidualVQ([vqt.ResidualVQ(4, 5, 2)], [nn.Conv1d(3, 4, 1)], [nn.Conv1d(4, 3, 1)])
    with pytest.raises(ValueError, match="as many projections"):
        SplitResidualVQ([vqt.ResidualVQ(4, 5, 2, channel_dim=1)], [], [])
