import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from evaluation.dense_heads import UperNetHead, default_blocks, rescale
from evaluation.segmentation import Segmenter, confusion_matrix, segmentation_metrics, slide_logits
from hpc_mim.data.dense import IGNORE
from hpc_mim.distributed.env import free_port
from hpc_mim.models.vit import ViTEncoder


def test_miou_and_pixel_accuracy_match_a_hand_computation():
    # 3 classes; one pixel ignored; class 2 never appears in the labels but is predicted once
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 1, 0]])
    conf = confusion_matrix(pred, target, 3)
    # rows = truth: class 0: 2 right, 1 as class 1; class 1: 3 right, 1 as class 2
    assert conf.tolist() == [[2, 1, 0], [0, 3, 1], [0, 0, 0]]
    m = segmentation_metrics(conf)
    iou0 = 2 / (3 + 2 - 2)               # |pred 0 & true 0| / |pred 0 | true 0| = 2 / 3
    iou1 = 3 / (4 + 4 - 3)               # 3 / 5
    iou2 = 0 / (0 + 1 - 0)               # predicted once, never true: 0
    assert m["iou/0"] == pytest.approx(100 * iou0)
    assert m["iou/1"] == pytest.approx(100 * iou1)
    assert m["iou/2"] == pytest.approx(0.0)
    assert m["miou"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7)          # ignored pixel left out
    assert m["macc"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)  # class 2 has no pixels: skipped


def test_a_class_absent_from_labels_and_predictions_is_not_averaged():
    conf = torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    m = segmentation_metrics(conf)
    assert m["miou"] == 100.0 and "iou/2" not in m


@pytest.mark.parametrize("size, crop, stride", [((64, 64), 32, 16), ((40, 56), 32, 21), ((20, 24), 32, 16)])
def test_sliding_windows_reproduce_a_translation_equivariant_model(size, crop, stride):
    # a 1x1 conv gives the same logits whatever the window: averaging overlaps must give them back
    model = nn.Conv2d(3, 5, 1)
    image = torch.randn(1, 3, *size)
    out = slide_logits(model, image, 5, crop, stride)
    assert out.shape == (1, 5, *size)
    torch.testing.assert_close(out, model(image), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factors, sizes", [
    ((4, 2, 1, 0.5), [(64, 64), (32, 32), (16, 16), (8, 8)]),       # ViT-B/16 at 256 px: strides 4-32
    ((2, 1, 0.5, 0.25), [(32, 32), (16, 16), (8, 8), (4, 4)]),
])
def test_block_maps_are_rescaled_by_the_pyramid_factors(factors, sizes):
    x = torch.randn(2, 8, 16, 16)                                   # a 16 x 16 token grid
    assert [tuple(rescale(8, f, nn.BatchNorm2d)(x).shape[-2:]) for f in factors] == sizes
    assert len(rescale(8, 4, nn.BatchNorm2d)) == 4                  # deconv, norm, GELU, deconv


def test_segmenter_predicts_every_pixel_and_reads_the_chosen_blocks():
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=6, num_heads=2)
    model = Segmenter(enc, num_classes=11, channels=16, blocks=default_blocks(6)).eval()
    assert model.blocks == [1, 2, 3, 5]
    assert default_blocks(12) == [3, 5, 7, 11] and default_blocks(24) == [7, 11, 15, 23]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 11, 32, 32)   # 8x8 tokens at 32 px
    head = UperNetHead(32, 16, 11).eval()                                  # x4 .. x0.5
    assert head([torch.randn(1, 32, 8, 8)] * 4).shape == (1, 11, 32, 32)


# ------------------------------------------------------------------ synced BatchNorm over ranks

DIM, CHANNELS, CLASSES, GRID = 8, 6, 3, 8          # 8 x 8 tokens: maps 32, 16, 8, 4 px


def head_and_batch(batch: int) -> tuple[UperNetHead, list[torch.Tensor], torch.Tensor]:
    """The same head on every process (seeded), four block maps (batch, DIM, GRID, GRID) whose
    means and scales differ per channel, and the weights of a linear loss on the logits."""
    torch.manual_seed(0)
    head = UperNetHead(DIM, CHANNELS, CLASSES).train()
    head.dropout.p = 0.0                           # Dropout2d would draw differently per rank
    g = torch.Generator().manual_seed(1)
    shift = torch.randn(1, DIM, 1, 1, generator=g) * 2
    blocks = [torch.randn(batch, DIM, GRID, GRID, generator=g) * (i + 1) + shift for i in range(4)]
    weight = torch.randn(batch, CLASSES, 4 * GRID, 4 * GRID, generator=g)
    return head, blocks, weight


def run_head(head: UperNetHead, blocks: list[torch.Tensor], weight: torch.Tensor) -> dict:
    """Logits, input and parameter gradients of sum(logits * weight), and every BatchNorm's
    running statistics after the step."""
    blocks = [b.clone().requires_grad_(True) for b in blocks]
    logits = head(blocks)
    (logits * weight).sum().backward()
    norms = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return {"logits": logits.detach(), "input_grads": [b.grad for b in blocks],
            "param_grads": {k: p.grad for k, p in head.named_parameters()},
            "running": [(m.running_mean.clone(), m.running_var.clone()) for m in norms]}


# global batch, and the tolerance relative to each tensor's largest value (at least 1: a bias
# before a BatchNorm has a zero gradient, but for rounding): with two values per channel in
# all, the pooled branch's BatchNorm outputs ~+-1 and its input gradient is a difference of
# nearly equal terms (zero but for eps) scaled by 1 / std: rounding shows at 1e-4
CASES = {"2 images per rank": (4, 1e-4), "1 image per rank": (2, 1e-3)}


def upernet_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for name, (batch, _) in CASES.items():
        head, blocks, weight = head_and_batch(batch)
        mine = slice(rank * batch // 2, (rank + 1) * batch // 2)       # this rank's half
        out[(rank, name)] = run_head(head, [b[mine] for b in blocks], weight[mine])
    dist.destroy_process_group()


def test_upernet_batchnorms_over_two_ranks_match_one_process_on_the_whole_batch():
    """mmsegmentation's SyncBN: two gloo ranks with half a batch each train the head as one
    process does on the whole batch: the same logits, input gradients, summed parameter
    gradients (what the gradient all-reduce adds up) and running statistics, on both ranks.
    With one image per rank the pooled 1 x 1 PPM branch holds one value per channel per rank,
    where a per-rank BatchNorm raises ("Expected more than 1 value per channel")."""
    out = mp.Manager().dict()
    mp.spawn(upernet_worker, args=(free_port(), out), nprocs=2, join=True)
    for name, (batch, tol) in CASES.items():
        def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0),
                                       msg=lambda m: f"{name}, {what}: {m}")

        ref = run_head(*head_and_batch(batch))                          # one process: plain BN
        r0, r1 = out[(0, name)], out[(1, name)]
        close(torch.cat([r0["logits"], r1["logits"]]), ref["logits"], "logits")
        for i, (g0, g1, g) in enumerate(zip(r0["input_grads"], r1["input_grads"], ref["input_grads"])):
            close(torch.cat([g0, g1]), g, f"gradient of block map {i}")
        assert r0["param_grads"].keys() == ref["param_grads"].keys()
        for k, g in ref["param_grads"].items():
            close(r0["param_grads"][k] + r1["param_grads"][k], g, f"gradient of {k}")
        assert len(ref["running"]) == 13                 # 1 in the x4 rescale + 12 ConvModules
        for i, ((m0, v0), (m1, v1), (m, v)) in enumerate(zip(r0["running"], r1["running"], ref["running"])):
            assert torch.equal(m0, m1) and torch.equal(v0, v1)        # every rank evaluates alike
            close(m0, m, f"running mean {i}")
            close(v0, v, f"running var {i}")
    # and a single process with one image is still plain BatchNorm, which refuses it
    head, blocks, _ = head_and_batch(1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        head(blocks)


# ------------------------------------------------------------------ mmseg's heads and losses

def tiny_segmenter(aux_channels: int = 16) -> Segmenter:
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2)
    return Segmenter(enc, num_classes=11, channels=64, blocks=default_blocks(6), aux_channels=aux_channels)


def test_auxiliary_head_is_mmsegs_fcn_head_on_the_third_neck_map():
    """upernet_mae.py's auxiliary_head: FCNHead(in_index=2, channels=256 (16 here), num_convs=1,
    kernel 3, concat_input=False, dropout_ratio=0.1, SyncBN); conv_seg normal(0, 0.01)."""
    from hpc_mim.models.heads import SyncBatchNorm2d
    model = tiny_segmenter()
    conv, norm, act = model.aux_head.convs
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias) == \
        (32, 16, (3, 3), (1, 1), None)
    assert isinstance(norm, SyncBatchNorm2d) and isinstance(act, nn.ReLU)
    assert isinstance(model.aux_head.dropout, nn.Dropout2d) and model.aux_head.dropout.p == 0.1
    assert isinstance(model.head.dropout, nn.Dropout2d) and model.head.dropout.p == 0.1
    for cls in (model.aux_head.classifier, model.head.classifier):       # mmseg's conv_seg init
        assert cls.kernel_size == (1, 1) and cls.out_channels == 11
        assert abs(cls.weight.std().item() - 0.01) < 0.002 and not cls.bias.any()
    # mmcv ConvModule: kaiming normal, fan_out, ReLU gain: std sqrt(2 / (out * k * k))
    fuse = model.head.fuse[0]
    assert fuse.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    # the auxiliary head reads the x1 map: block default_blocks(6)[2] itself
    seen = []
    model.aux_head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x, aux=True)
        assert torch.equal(seen[0], model.encoder.forward_intermediates(x, [model.blocks[2]])[0])


def test_loss_is_decode_plus_0_4_aux_each_averaged_over_all_pixels():
    """mmseg's losses: CrossEntropyLoss (avg_non_ignore=False: the mean over every pixel, an
    ignored one counting 0) of the decode head + 0.4 x that of the auxiliary head, both at the
    label's size; SegmentationTask.forward calls the model with aux=True."""
    from evaluation.segmentation import SegmentationTask
    model = tiny_segmenter().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, 11, (2, 32, 32), generator=g)
    y[:, :, 20:] = IGNORE                                      # padding: ignored
    task = SegmentationTask.__new__(SegmentationTask)          # only what forward reads
    task.device, task.aux_weight = torch.device("cpu"), 0.4
    torch.manual_seed(5)                                       # the same dropout masks below
    out = task.forward(model, (x, y))
    torch.manual_seed(5)
    logits, aux = model(x, aux=True)
    assert logits.shape == aux.shape == (2, 11, 32, 32)

    def by_hand(z: torch.Tensor) -> torch.Tensor:
        logp = z.float().log_softmax(1)
        keep = y != IGNORE
        picked = logp.gather(1, y.clamp(max=10)[:, None])[:, 0]
        return -(picked * keep).sum() / y.numel()               # all 2 x 32 x 32 pixels
    torch.testing.assert_close(out["decode"], by_hand(logits))
    torch.testing.assert_close(out["aux"], by_hand(aux))
    torch.testing.assert_close(out["loss"], by_hand(logits) + 0.4 * by_hand(aux))
    # not PyTorch's default mean over the labelled pixels only
    assert not torch.allclose(out["decode"], F.cross_entropy(logits, y, ignore_index=IGNORE))


def test_auxiliary_head_is_not_used_at_inference():
    model = tiny_segmenter().eval()
    calls = []
    model.aux_head.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        logits = slide_logits(model, x, 11, 32, 16)
        out = model(x[..., :32, :32])
        for p in model.aux_head.parameters():                  # its weights change nothing
            p.add_(1.0)
        assert torch.equal(model(x[..., :32, :32]), out)
    assert logits.shape == (1, 11, 40, 48) and isinstance(out, torch.Tensor) and not calls
    no_aux = tiny_segmenter(aux_channels=0)
    assert no_aux.aux_head is None and no_aux(torch.randn(2, 3, 32, 32), aux=True)[1] is None


def test_segmentation_defaults_are_the_mae_ade20k_protocol():
    from hpc_mim.eval_options import SegmentationConfig
    s = SegmentationConfig()
    assert (s.aux_weight, s.aux_channels, s.photometric, s.cat_max_ratio, s.rel_pos) == \
        (0.4, 256, True, 0.75, True)
    assert (s.channels, s.crop_size, s.stride, s.scale, s.layer_decay) == (768, 512, 341, 512, 0.65)


def test_segmentation_end_to_end_on_a_tiny_run(tmp_path, data_root, monkeypatch):
    """The smoke preset's segmentation (3 steps, 32 px crops) from a run directory: the
    relative position table is added on the crop's 8 x 8 token grid, and the run trains with
    the auxiliary head and the photometric distortion, then evaluates by sliding windows."""
    from evaluation import segmentation
    from hpc_mim import tracking
    from hpc_mim.config import load_config, save_config
    from hpc_mim.models.relpos import RelPosAttention
    from hpc_mim.rundir import RunDir
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)   # join() exports them: not into later tests' jobs
    cfg = load_config("mae", "smoke", overrides=[f"data.root={data_root}", "eval.baselines=[]"])
    run = RunDir(tmp_path / "run").create()
    save_config(cfg, run.config)
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "test")
    run.write_tracking({"uri": uri, "experiment_id": exp,
                        "run_id": tracking.MLflowLogger.create_run(uri, exp, "pretrain").run_id})
    added, add = [], segmentation.add_relative_position

    def record(encoder, kind, grid, *args, **kwargs):
        add(encoder, kind, grid, *args, **kwargs)
        added.append((kind, tuple(grid), all(isinstance(b.attn, RelPosAttention) for b in encoder.blocks)))
    monkeypatch.setattr(segmentation, "add_relative_position", record)
    out = segmentation.main(str(run.root), baseline="random_init")["random_init"]
    assert added == [("table", (8, 8), True)]
    assert 0 <= out["miou"] <= 100 and 0 <= out["pixel_acc"] <= 100
