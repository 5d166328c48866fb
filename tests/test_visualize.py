import pytest
import torch

from glmix_kernels import visualize

pytest.importorskip("matplotlib", reason="the visualisation needs the 'plot' extra (matplotlib)")


def test_command_writes_the_slot_maps_png(tmp_path):
    import matplotlib.image

    image_file = tmp_path / "in.png"
    matplotlib.image.imsave(image_file, torch.rand(40, 50, 3).numpy())
    out = tmp_path / "maps.png"
    assert (
        visualize.main(
            [
                "--model",
                "glnet_stl",
                "--image",
                str(image_file),
                "--size",
                "64",
                "--stage",
                "1",
                "--block",
                "1",
                "--slots",
                "0",
                "5",
                "63",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    png = matplotlib.image.imread(out)
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 300  # one row of 4 panels
    assert png[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_maps_are_a_softmax_over_slots():
    model = visualize.create_model("glnet_4g", backend="reference")
    maps = visualize.slot_maps(model, visualize.load_image(None, 64), stage=0, block=2)
    assert maps.shape == (64, 64, 64)
    torch.testing.assert_close(maps.sum(0), torch.ones(64, 64))


def test_checkpoint_is_loaded(tmp_path):
    model = visualize.create_model("glnet_stl", backend="reference")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    out = tmp_path / "maps.png"
    assert (
        visualize.main(
            ["--model", "glnet_stl", "--checkpoint", str(path), "--size", "64", "--slots", "1", "--out", str(out)]
        )
        == 0
    )
    assert out.stat().st_size > 0
