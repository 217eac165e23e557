"""The environment works: torchvision transforms, a timm model, peft import."""

import torch


def test_torchvision_transforms_on_tensor() -> None:
    from torchvision.transforms import InterpolationMode, v2

    img = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    flip_up = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.Resize((8, 12), InterpolationMode.NEAREST)])
    expected = torch.flip(img, dims=[-1]).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    torch.testing.assert_close(flip_up(img), expected)
    normed = v2.Normalize(mean=[1.0, 2.0], std=[2.0, 4.0])(img)
    torch.testing.assert_close(normed[1], (img[1] - 2.0) / 4.0)


def test_timm_model_builds_and_runs() -> None:
    import timm

    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 10)
    assert torch.isfinite(logits).all()


def test_peft_imports() -> None:
    import peft

    assert callable(peft.get_peft_model)
