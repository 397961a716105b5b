"""Networks of the paper: denoising ops and blocks, ImageNet ResNet/ResNeXt, small-image nets."""
