"""--aa policies, colour jitter and random erasing against timm's and torchvision's own code: the
same pixels for the same drawn parameters (every op over a grid of levels), and the same
distribution of draws (counts over a few thousand draws, fixed seeds)."""

import random
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing as TimmErasing
from torchvision.transforms import autoaugment as tv_aa

from densenet_jax.data import augment as A
from densenet_jax.data import augment_policies as P

LEVELS = (0, 0.5, 1, 2, 3, 4.5, 5, 6, 7.3, 8, 9, 10)
FILTERS = (Image.BILINEAR, Image.BICUBIC)


@pytest.fixture(scope="module")
def picture():
    """A 23x17 RGB picture with smooth gradients, edges and noise (odd sizes catch centring)."""
    y, x = np.mgrid[0:17, 0:23]
    noise = np.random.default_rng(0).integers(0, 60, (17, 23, 3))
    rgb = np.stack([x * 11, y * 15, (x * y) % 200], -1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _timm_argument(name, level, negate, hparams):
    """timm's argument for op ``name`` at ``level``, its coin for the sign forced to ``negate``."""
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    if level_fn is None:
        return ()
    with mock.patch.object(timm_aa.random, "random", return_value=0.9 if negate else 0.1):
        return level_fn(level, hparams)


@pytest.mark.parametrize("name", sorted(P.OPS))
def test_every_op_at_every_level_gives_timms_pixels(picture, name):
    settings = P.OpSettings(fill=(124, 116, 104), translate_const=10, translate_pct=0.45)
    hparams = dict(translate_const=10, img_mean=(124, 116, 104), translate_pct=0.45)
    op = P.AugmentOp(name, 1.0, 10, settings)
    for level in LEVELS:
        for negate in (False, True):
            theirs = _timm_argument(name, level, negate, hparams)
            ours = op.argument(level, negate)
            assert (() if ours is None else (ours,)) == theirs, (name, level, negate)
            for resample in FILTERS if op.geometric else (None,):
                if "Posterize" in name and ours == 0:  # timm raises (Pillow refuses 0 bits): black
                    with pytest.raises(ValueError):
                        timm_aa.NAME_TO_OP[name](picture, *theirs)
                    assert not np.asarray(op.apply(picture, (ours, None))).any()
                    continue
                expected = timm_aa.NAME_TO_OP[name](picture, *theirs, fillcolor=(124, 116, 104),
                                                    resample=resample or Image.BICUBIC)
                got = op.apply(picture, (ours, resample))
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected),
                                              err_msg=f"{name} level {level} negate {negate}")


def test_ta_wide_ops_at_every_magnitude_give_torchvisions_pixels(picture):
    space = tv_aa.TrivialAugmentWide()._augmentation_space(31)
    assert list(space) == list(P.TA_WIDE_OPS)
    ta = P.TrivialAugmentWide(Image.BILINEAR)
    for name, (magnitudes, signed) in space.items():
        table = [float(m) for m in magnitudes.reshape(-1)] if magnitudes.ndim else None
        assert P.TA_WIDE_OPS[name][1] == table, name
        for magnitude in table or [0.0]:
            for m in (magnitude, -magnitude) if signed else (magnitude,):
                expected = tv_aa._apply_op(picture, name, m, TF.InterpolationMode.BILINEAR, None)
                np.testing.assert_array_equal(np.asarray(ta.apply(picture, name, m)), np.asarray(expected),
                                              err_msg=f"{name} {m}")


def test_autoaugment_policies_are_timms():
    for name in ("original", "v0"):
        ours = [[(op.name, op.prob, op.magnitude) for op in sub]
                for sub in P.auto_augment_policy(name, P.OpSettings())]
        theirs = [[(op.name, op.prob, op.magnitude) for op in sub]
                  for sub in timm_aa.auto_augment_policy(name)]
        assert ours == theirs, name


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5", "rand-m9-n3-mstd0.5-inc1", "rand-m7-p0.3-mmax12-mstd101",
                                  "rand-m99", "rand-m9-mmax0"])
def test_rand_augment_spec_builds_timms_ops(spec):
    theirs = timm_aa.rand_augment_transform(spec, dict(translate_const=100, img_mean=(1, 2, 3)))
    ours = P.auto_augment(spec, P.OpSettings(fill=(1, 2, 3), translate_const=100))
    assert ours.n == theirs.num_layers
    assert [(o.name, o.prob, o.magnitude) for o in ours.ops] == \
        [(o.name, o.prob, o.magnitude) for o in theirs.ops]
    assert ours.ops[0].settings.magnitude_std == theirs.ops[0].magnitude_std
    assert ours.ops[0].settings.magnitude_max == (theirs.ops[0].magnitude_max or 10)


@pytest.mark.parametrize("spec", ["rand-m9-x3", "rand-mx", "augmix-b1", "v1", "ta_wide-m3", "original-m3"])
def test_unknown_aa_spec_names_the_fault(spec):
    with pytest.raises(ValueError, match=f"--aa {spec}"):
        P.auto_augment(spec, P.OpSettings())


def test_augmix_mixes_chains_as_timm(picture):
    weights, blend = np.float32([0.2, 0.5, 0.3]), np.float32(0.37)
    chain_op = timm_aa.AugmentOp("Rotate", prob=1.0, magnitude=6, hparams=dict(
        translate_const=10, img_mean=(0, 0, 0), interpolation=Image.BILINEAR))
    theirs = timm_aa.AugMixAugment([chain_op], width=3, depth=1)
    with mock.patch.object(timm_aa.random, "random", return_value=0.1):
        expected = theirs._apply_basic(picture, weights, blend)
    ours_op = P.AugmentOp("Rotate", 1.0, 6, P.OpSettings(fill=(0, 0, 0)))
    chain = [lambda im: ours_op.apply(im, (18.0, Image.BILINEAR))] * 3
    np.testing.assert_array_equal(np.asarray(P.mix_chains(picture, weights, blend, chain)), np.asarray(expected))


@pytest.mark.parametrize("index,adjust", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                          (2, TF.adjust_saturation), (3, TF.adjust_hue)])
def test_colour_jitter_adjustments_are_torchvisions(picture, index, adjust):
    for factor in ((-0.5, -0.23, 0.0, 0.1, 0.49) if index == 3 else (0.0, 0.3, 0.6, 1.0, 1.4, 1.9)):
        got = A.ColorJitter.apply(picture, [(index, factor)])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(adjust(picture, factor)), err_msg=str(factor))


def test_random_erasing_fills_as_timm():
    image = np.random.default_rng(0).standard_normal((9, 11, 3)).astype(np.float32)
    fill = np.random.default_rng(1).standard_normal((4, 5, 3)).astype(np.float32)
    expected = torch.from_numpy(image.transpose(2, 0, 1).copy())
    expected[:, 2:6, 3:8] = torch.from_numpy(fill.transpose(2, 0, 1))
    got = A.RandomErasing.apply(image, [(2, 3, 4, 5, fill)])
    np.testing.assert_array_equal(got, expected.numpy().transpose(1, 2, 0))


# Distributions: a few thousand draws of ours against timm's (or torchvision's), fixed seeds,
# counts compared within a few standard errors.

def _close(ours, theirs, n, what):
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    tolerance = 4 * np.sqrt(2 * np.maximum(theirs * (1 - theirs), 1e-4) / n)  # 4 sigma of a difference
    assert np.all(np.abs(ours - theirs) <= tolerance), (what, ours, theirs)


def _timm_rand_draws(spec, n):
    random.seed(0)
    np.random.seed(0)
    transform = timm_aa.rand_augment_transform(spec, dict(translate_const=10, img_mean=(0, 0, 0)))
    draws = []
    for op in transform.ops:
        # timm draws the filter inside the geometric ops (which this recorder stands in for).
        geometric = P.OPS[op.name][3]
        op.aug_fn = lambda img, *args, _n=op.name, _g=geometric, **kw: draws.append((
            _n, args[0] if args else 0, timm_aa._interpolation(dict(kw)) if _g else None)) or img
    image = Image.new("RGB", (4, 4))
    for _ in range(n):
        transform(image)
    return draws


def _our_rand_draws(spec, n):
    transform = P.auto_augment(spec, P.OpSettings(fill=(0, 0, 0), translate_const=10))
    draws, rng = [], np.random.default_rng(0)
    with mock.patch.object(P.AugmentOp, "apply",
                           lambda self, img, d: draws.append((self.name, d[0] or 0, d[1])) or img):
        image = Image.new("RGB", (4, 4))
        for _ in range(n):
            transform(image, rng)
    return draws


def _summary(draws, names):
    """Per op: share of all draws, share negative, mean |argument|; share bicubic among geometric."""
    by_name = {k: [abs(a) for n, a, _ in draws if n == k] for k in names}
    signs = {k: np.mean([a < 0 for n, a, _ in draws if n == k]) for k in names}
    return by_name, signs


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5", "rand-m9-n3-mstd0.5-inc1"])
def test_rand_augment_draws_match_timms(spec):
    n = 5000
    ours, theirs = _our_rand_draws(spec, n), _timm_rand_draws(spec, n)
    layers = 3 if "-n3" in spec else 2
    names = sorted({d[0] for d in theirs})
    _close(len(ours) / (n * layers), len(theirs) / (n * layers), n * layers, "applied")
    shares = lambda draws: [sum(d[0] == k for d in draws) / len(draws) for k in names]
    _close(shares(ours), shares(theirs), len(theirs), "op shares")
    (mags_o, sign_o), (mags_t, sign_t) = _summary(ours, names), _summary(theirs, names)
    signed = [k for k in names if sign_t[k] > 0]
    negated = lambda draws: np.mean([a < 0 for n, a, _ in draws if n in signed])
    _close(negated(ours), negated(theirs), sum(len(mags_t[k]) for k in signed), "negated")
    for k in names:
        spread = np.std(mags_t[k]) + 1e-9
        assert abs(np.mean(mags_o[k]) - np.mean(mags_t[k])) < 5 * spread / np.sqrt(len(mags_t[k])) + 1e-9, k
    bicubic = lambda draws: np.mean([r == Image.BICUBIC for _, _, r in draws if r is not None])
    _close(bicubic(ours), bicubic(theirs), len(theirs) // 2, "bicubic")


def test_ta_wide_draws_match_torchvisions():
    n = 2500
    torch.manual_seed(0)
    theirs = []
    with mock.patch.object(tv_aa, "_apply_op", lambda img, name, m, **kw: theirs.append((name, m)) or img):
        transform = tv_aa.TrivialAugmentWide()
        image = Image.new("RGB", (4, 4))
        for _ in range(n):
            transform(image)
    rng, ta = np.random.default_rng(0), P.TrivialAugmentWide()
    ours = [ta.draw(rng) for _ in range(n)]
    names = list(P.TA_WIDE_OPS)
    shares = lambda draws: [sum(d[0] == k for d in draws) / n for k in names]
    _close(shares(ours), shares(theirs), n, "op shares")
    negative = lambda draws: np.mean([m < 0 for k, m in draws if k == "Rotate"])
    _close(negative(ours), negative(theirs), n // 14, "Rotate negated")
    bins = lambda draws: np.mean([abs(m) for k, m in draws if k == "ShearX"])
    assert abs(bins(ours) - bins(theirs)) < 0.06


def _boxes(erase, n, draw):
    """(share erased, mean top, left, height, width) of single boxes drawn ``n`` times on 3x20x30."""
    found = []
    for _ in range(n):
        box = draw()
        if box is not None:
            found.append(box)
    return [len(found) / n, *np.mean(found, 0)]


def test_random_erasing_draws_match_timms():
    n = 3000
    random.seed(0)
    timm_erase = TimmErasing(0.4, mode="const", device="cpu")

    def theirs():
        img = torch.ones(3, 20, 30)
        timm_erase(img)
        rows, cols = np.nonzero(img[0].numpy() == 0)
        return None if not len(rows) else (rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1)

    rng, ours_erase = np.random.default_rng(0), A.RandomErasing(0.4)

    def ours():
        boxes = ours_erase.draw(rng, 20, 30, 3)
        return boxes[0][:4] if boxes else None

    a, b = _boxes(ours_erase, n, ours), _boxes(timm_erase, n, theirs)
    _close(a[0], b[0], n, "erased share")
    assert np.allclose(a[1:], b[1:], rtol=0.08), (a, b)


def test_augment_flags_build_the_transform_mixer_and_loss(tmp_path):
    """Each flag reaches the run it builds: the folder's crop, flips, policy and erasing, the batch
    mixer and the loss; the run's record names them; the default run keeps the folder's own."""
    from densenet_jax import cli
    from densenet_jax.cli.train import train_config
    from densenet_jax.data.mixup import Mixup
    from densenet_jax.train.loop import Run
    from fixtures import write_image_folder

    root = write_image_folder(tmp_path / "images")
    argv = ["train", "--model", "densenet_bc_16_k12", "--dataset", "folder", "--data-dir", str(root),
            "--image-size", "32", "--batch-size", "4", "--workdir", str(tmp_path / "run"),
            "--aa", "rand-m7-n3-mstd0.5-inc1", "--color-jitter", "0.3", "--reprob", "0.25", "--remode", "pixel",
            "--recount", "2", "--scale", "0.5", "0.9", "--ratio", "0.8", "1.25", "--hflip", "0.3",
            "--vflip", "0.2", "--train-interpolation", "bicubic", "--mixup", "0.8", "--cutmix", "1.0",
            "--cutmix-minmax", "0.2", "0.8", "--mixup-prob", "0.7", "--mixup-switch-prob", "0.4",
            "--mixup-mode", "pair", "--smoothing", "0.1", "--bce-loss"]
    run = Run(train_config(cli.parser().parse_args(argv)))
    crop, hflip, vflip, policy, normalize, erase = run.data.augment.transforms
    assert (crop.size, crop.scale, crop.interpolations) == (32, (0.5, 0.9), (Image.BICUBIC,))
    assert np.allclose(np.exp(crop.log_ratio), (0.8, 1.25))
    assert (hflip.prob, hflip.vertical, vflip.prob, vflip.vertical) == (0.3, False, 0.2, True)
    rand = policy.policy  # --aa wins over --color-jitter, as timm
    assert isinstance(rand, P.RandAugment) and rand.n == 3 and rand.ops[4].name == "PosterizeIncreasing"
    assert rand.ops[0].magnitude == 7 and rand.ops[0].settings.interpolations == (Image.BICUBIC,)
    assert rand.ops[0].settings.translate_const == int(32 * 0.45)
    assert (erase.prob, erase.mode, erase.count) == (0.25, "pixel", 2)
    assert isinstance(run.mixer, Mixup) and run.mixer.o.cutmix_minmax == (0.2, 0.8)
    assert (run.mixer.o.mixup, run.mixer.o.mixup_prob, run.mixer.o.mixup_switch_prob,
            run.mixer.o.mixup_mode, run.mixer.o.smoothing) == (0.8, 0.7, 0.4, "pair", 0.1)
    assert run.runner.steps.loss.bce and run.runner.steps.loss.smoothing == 0  # smoothing is in the targets
    assert run.record["identity"]["augmentation"]["aa"] == "rand-m7-n3-mstd0.5-inc1"
    example = run.data.augment(run.data.train[0], np.random.default_rng(0))
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.float32

    # Without --aa, the jitter; with neither, the folder's own transform, no mixer, no record.
    from densenet_jax.data import load_dataset
    from densenet_jax.train import augment_config

    folder = load_dataset("folder", root, image_size=32)
    jitter = train_config(cli.parser().parse_args(argv[:11] + ["--color-jitter", "0.3"]))
    assert isinstance(augment_config.with_augmentation(folder, jitter).augment.transforms[2].policy, A.ColorJitter)
    plain = train_config(cli.parser().parse_args(argv[:11]))
    assert augment_config.with_augmentation(folder, plain) is folder
    assert augment_config.batch_mixer(plain, 3) is None and augment_config.record(plain) == {}


@pytest.mark.parametrize("options,message", [
    (dict(aa="rand-m9-q2"), "--aa rand-m9-q2: unknown RandAugment section 'q2'"),
    (dict(remode="zeros"), "--remode 'zeros': must be one of const, rand, pixel"),
    (dict(reprob=1.5), "--reprob 1.5: must be 0 to 1"),
    (dict(scale=(0.9, 0.5)), "--scale 0.9 0.5: two numbers, 0 < low <= high"),
    (dict(dataset="digits", scale=(0.5, 1.0)), "--scale sets a folder's random resized crop"),
    (dict(dataset="digits", hflip=0.0), "--dataset digits is never flipped"),
    (dict(mixup=-1.0), "--mixup -1.0: must be at least 0"),
    (dict(mixup_mode="row"), "--mixup-mode 'row': must be one of batch, pair, elem"),
    (dict(cutmix_minmax=(0.5, 0.5)), "--cutmix-minmax 0.5 0.5: low must be below high"),
    (dict(smoothing=1.0), "--smoothing 1.0: must be 0 to 1"),
    (dict(mixup=0.8, batch_size=7), "--batch-size 7: mixup and CutMix pair"),
])
def test_bad_augment_options_are_refused_in_one_line(options, message):
    from densenet_jax.train.config import TrainConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        TrainConfig(**{"dataset": "cifar10", "data_dir": None if options.get("dataset") else "x", **options})
    assert "\n" not in str(info.value)


def test_colour_jitter_draws_match_torchvisions():
    import torchvision.transforms as TT

    n, ranges = 2000, ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    torch.manual_seed(0)
    theirs = [TT.ColorJitter.get_params(*ranges) for _ in range(n)]
    rng, ours_jitter = np.random.default_rng(0), A.ColorJitter(0.4, 0.4, 0.4, 0.1)
    ours = [ours_jitter.draw(rng) for _ in range(n)]
    for position in (0, 3):  # which adjustment comes first, and last
        share = lambda orders: [np.mean([o[position] == k for o in orders]) for k in range(4)]
        _close(share([[i for i, _ in d] for d in ours]), share([list(t[0].numpy()) for t in theirs]), n, position)
    for k in range(4):
        mine = np.mean([f for d in ours for i, f in d if i == k])
        assert abs(mine - np.mean([t[k + 1] for t in theirs])) < 0.02, k
