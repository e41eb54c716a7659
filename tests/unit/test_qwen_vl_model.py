"""Qwen-VL (v1) on one process: the ViT and the resampler against a plain-PyTorch reference written
here (same weights, fp32), the sin-cos table against the MAE formula in numpy, visual tokens in
place, attention masks (images and packed samples do not see each other), gradients, errors.

No HF class exists for Qwen-VL: the reference follows the released `visual.py` structure
(Conv2d patch embed, bicubic `get_abs_pos`, ln_pre, blocks with a per-head [q|k|v] `in_proj`,
`nn.MultiheadAttention` resampler, ln_post, `@ proj`), written independently of the model code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.schema import IGNORE_INDEX, PackedBatch
from data_pipelines.text import QWEN_VL_IMAGE_PAD_ID  # noqa: E402
from qvl_train.config import ParallelConfig
from qvl_train.models import build_model, init_weights
from qvl_train.models.vision.qwen_vl import sincos_2d
from tests.conftest import megatron_one_rank_world  # noqa: E402
from tests.unit.test_model_params import load_model_config

IMG_START, IMG_END = 151857, 151858


@pytest.fixture(scope="module")
def model():
    megatron_one_rank_world()
    cfg = load_model_config("qwen_vl/tiny")
    cfg.attention_backend = "sdpa_loop"
    m = build_model(cfg, ParallelConfig(), pre_process=True, post_process=True)
    init_weights(m, seed=3, std=0.02)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere (norm scales and biases too), not the init
        for name, p in m.named_parameters():
            if not name.startswith("llm.") and name != "projector.pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 0.05))
    return cfg, m


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def _patch_rows(img_N3HW: torch.Tensor) -> torch.Tensor:
    """`pixel_values` of the data contract: 32×32 patches row-major, columns (C, ph, pw)."""
    n = img_N3HW.shape[0]
    x = img_N3HW.reshape(n, 3, 32, 14, 32, 14).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n * 1024, 3 * 14 * 14)


def _abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    src, dst = int(math.sqrt(table.shape[0])), int(math.sqrt(tokens))
    if src == dst:
        return table
    x = table.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(x, size=(dst, dst), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(dst * dst, -1)


def _reference_vit(m, cfg, img_N3HW: torch.Tensor) -> torch.Tensor:
    """The tower as the released code computes it, from our parameters (fp32)."""
    v, sd = cfg.vision, m.state_dict()
    hv, heads = v.hidden_size, v.num_heads
    d = hv // heads
    conv_w = sd["vision.patch_embed.weight"].reshape(hv, 3, 14, 14)
    x = F.conv2d(img_N3HW, conv_w, stride=14).flatten(2).transpose(1, 2)  # [N, 1024, Hv]
    x = x + _abs_pos(sd["vision.positional_embedding"], x.shape[1])
    x = F.layer_norm(x, (hv,), sd["vision.ln_pre.weight"], sd["vision.ln_pre.bias"], 1e-6)
    for i in range(v.depth):
        p = f"vision.decoder.layers.{i}."
        y = F.layer_norm(x, (hv,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], 1e-6)
        qkv = F.linear(y, sd[p + "self_attention.linear_qkv.weight"], sd[p + "self_attention.linear_qkv.bias"])
        q, k, val = qkv.view(*qkv.shape[:2], heads, 3 * d).split(d, dim=-1)  # per head [q | k | v]
        scores = torch.einsum("nqhd,nkhd->nhqk", q / math.sqrt(d), k).softmax(-1)
        o = torch.einsum("nhqk,nkhd->nqhd", scores, val).reshape(*x.shape)
        x = x + F.linear(o, sd[p + "self_attention.linear_proj.weight"], sd[p + "self_attention.linear_proj.bias"])
        y = F.layer_norm(x, (hv,), sd[p + "pre_mlp_layernorm.weight"], sd[p + "pre_mlp_layernorm.bias"], 1e-6)
        y = F.gelu(F.linear(y, sd[p + "mlp.linear_fc1.weight"], sd[p + "mlp.linear_fc1.bias"]))
        x = x + F.linear(y, sd[p + "mlp.linear_fc2.weight"], sd[p + "mlp.linear_fc2.bias"])
    return x


def _reference_resampler(m, cfg, x_NSD: torch.Tensor) -> torch.Tensor:
    """`nn.MultiheadAttention` with the resampler's weights (sequence-first, as the released code)."""
    sd = {k[len("projector."):]: t for k, t in m.state_dict().items() if k.startswith("projector.")}
    width = cfg.llm.hidden_size
    mha = torch.nn.MultiheadAttention(width, cfg.vision.resampler_heads)
    mha.load_state_dict({
        "in_proj_weight": sd["attn.in_proj.weight"], "in_proj_bias": sd["attn.in_proj.bias"],
        "out_proj.weight": sd["attn.out_proj.weight"], "out_proj.bias": sd["attn.out_proj.bias"],
    })
    ln = lambda t, n: F.layer_norm(t, (width,), sd[f"{n}.weight"], sd[f"{n}.bias"], 1e-6)  # noqa: E731
    kv = ln(F.linear(x_NSD, sd["kv_proj.weight"]), "ln_kv").permute(1, 0, 2)  # [S, N, H]
    n = kv.shape[1]
    q = ln(sd["query"], "ln_q")
    out = mha(q.unsqueeze(1).repeat(1, n, 1) + sd["pos_embed"].unsqueeze(1),
              kv + _abs_pos(sd["pos_embed"], kv.shape[0]).unsqueeze(1), kv, need_weights=False)[0]
    return ln(out.permute(1, 0, 2), "ln_post") @ sd["proj"]


def _sample(n_text: tuple[int, int], with_image: bool, gen: torch.Generator):
    ids = [torch.randint(0, 151000, (n_text[0],), generator=gen)]
    if with_image:
        ids.append(torch.tensor([IMG_START] + [QWEN_VL_IMAGE_PAD_ID] * 256 + [IMG_END]))
    ids.append(torch.randint(0, 151000, (n_text[1],), generator=gen))
    return torch.cat(ids)


def _batch(samples: list[tuple[tuple[int, int], torch.Tensor | None]], seed: int = 0, pad: int = 4) -> PackedBatch:
    """Samples (text lengths, image [3, 448, 448] or None) packed back to back; 1-D positions (3 equal rows)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [_sample(lens, img is not None, gen) for lens, img in samples]
    imgs = [img for _, img in samples if img is not None]
    lens = [len(i) for i in ids]
    n = sum(lens)
    input_ids = torch.cat(ids + [torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([torch.arange(k) for k in lens] + [torch.zeros(pad, dtype=torch.long)]).expand(3, -1).contiguous()
    labels = torch.cat([torch.randint(0, 151000, (k,), generator=gen) for k in lens] + [torch.full((pad,), IGNORE_INDEX)])
    return PackedBatch(
        input_ids=input_ids, labels=labels, position_ids=pos,
        cu_seqlens=torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32),
        pixel_values=_patch_rows(torch.stack(imgs)) if imgs else torch.zeros(0, 588),
        grid_thw=torch.tensor([[1, 32, 32]] * len(imgs), dtype=torch.long).reshape(-1, 3),
        sample_ids=[f"s{i}" for i in range(len(ids))], num_tokens=n,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()), num_visual_tokens=256 * len(imgs),
    )


def test_vit_and_resampler_match_the_reference(model):
    cfg, m = model
    imgs = _images(2, seed=1)
    with torch.no_grad():
        feats = m.vision(_patch_rows(imgs), torch.tensor([[1, 32, 32]] * 2))
        ref = _reference_vit(m, cfg, imgs)
        torch.testing.assert_close(feats.view(2, 1024, -1), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        out = m.projector(feats)
        ref_out = _reference_resampler(m, cfg, ref)
    assert out.shape == (2 * 256, cfg.llm.hidden_size)
    torch.testing.assert_close(out.view(2, 256, -1), ref_out, rtol=0, atol=1e-5 * float(ref_out.abs().max()))


def test_sincos_table_is_the_mae_formula():
    dim, side = 64, 16

    def one(d, pos):  # numpy float32, as the MAE / Qwen-VL helper computes it
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
    ref = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)
    np.testing.assert_allclose(sincos_2d(dim, side).numpy(), ref, atol=2e-6)


def test_visual_tokens_in_place_and_text_untouched(model):
    cfg, m = model
    b = _batch([((5, 7), _images(1, 2)[0]), ((3, 4), None)])
    with torch.no_grad():
        h = m.embed(b).squeeze(1)
        vis = m.projector(m.vision(b.pixel_values, b.grid_thw))
        text = m.llm.embed(b.input_ids).squeeze(1)
    at = b.input_ids == QWEN_VL_IMAGE_PAD_ID
    assert int(at.sum()) == 256
    assert torch.equal(h[at], vis) and torch.equal(h[~at], text[~at])


def test_masks_images_and_samples_are_independent(model):
    """Two images in one batch = each alone (ViT and resampler); a packed sample's losses = the sample alone."""
    cfg, m = model
    imgs = _images(2, seed=4)
    with torch.no_grad():
        both = m.projector(m.vision(_patch_rows(imgs), torch.tensor([[1, 32, 32]] * 2)))
        first = m.projector(m.vision(_patch_rows(imgs[:1]), torch.tensor([[1, 32, 32]])))
        torch.testing.assert_close(both[:256], first, rtol=0, atol=1e-6)
        packed = _batch([((6, 5), imgs[0]), ((4, 9), imgs[1])], seed=7)
        loss = m(packed)
        lo, hi = int(packed.cu_seqlens[1]), int(packed.cu_seqlens[2])
        alone = PackedBatch(  # the second sample cut out of the packed batch, run on its own
            input_ids=packed.input_ids[lo:hi], labels=packed.labels[lo:hi], position_ids=packed.position_ids[:, lo:hi],
            cu_seqlens=torch.tensor([0, hi - lo], dtype=torch.int32), pixel_values=packed.pixel_values[1024:],
            grid_thw=packed.grid_thw[1:], sample_ids=["s1"], num_tokens=hi - lo,
            num_label_tokens=int((packed.labels[lo:hi] != IGNORE_INDEX).sum()), num_visual_tokens=256,
        )
        torch.testing.assert_close(loss[lo:hi], m(alone), rtol=0, atol=1e-5)


def test_loss_gradients_and_text_only_batch(model):
    cfg, m = model
    m.zero_grad(set_to_none=True)
    b = _batch([((5, 7), _images(1, 5)[0]), ((3, 4), None)])
    loss = m(b)
    assert torch.all(loss[b.labels == IGNORE_INDEX] == 0) and torch.all(loss[b.labels != IGNORE_INDEX] > 0)
    (loss.sum() / b.num_label_tokens).backward()
    for prefix in ("vision.", "projector.", "llm."):
        grads = [p.grad for n, p in m.named_parameters() if n.startswith(prefix)]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, prefix
    m.zero_grad(set_to_none=True)
    m(_batch([((5, 7), None)])).sum().backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith(("vision.", "projector.")))


def test_clear_errors(model):
    cfg, m = model
    with pytest.raises(ValueError, match="448"):
        m.vision(torch.zeros(16 * 16, 588), torch.tensor([[1, 16, 16]]))
    b = _batch([((5, 7), _images(1, 6)[0])])
    b.input_ids[b.input_ids == QWEN_VL_IMAGE_PAD_ID] = 5
    with pytest.raises(ValueError, match="imgpad"):
        m(b)


def test_pos_embed_init_is_sincos(model):
    _, m = model
    assert torch.equal(m.projector.pos_embed.detach(), sincos_2d(m.cfg.llm.hidden_size, 16))
