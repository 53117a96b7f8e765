"""ImageReFL: reward fine-tuning of text-to-image diffusion models that keeps diversity (arXiv 2505.22569)

Modules:

- `imagerefl.explorer`: Base, tuned and combined generation side by side with their rewards: an ipywidgets explorer of the switch point and the two guidance scales.
- `imagerefl.export`: What a finished run leaves for its users: the tuned UNet or LoRA adapter, a ready-to-load combined-generation folder, its model card, and the upload to the Hugging Face Hub.
- `imagerefl.figures`: The paper's figures and tables from run outputs: the diversity collapse during training, the quality-diversity trade-off with its Pareto front, same-seed comparison grids, and the results table.
- `imagerefl.metrics`: Per-prompt diversity, FID/KID against real images, and an evaluation run that writes one table per image and a summary per run.
- `imagerefl.mini.nets`: The reward ("human preference") and the independent feature network of the embedded digits world, and where their shipped weights live.
- `imagerefl.mini.preference`: A small Bradley–Terry network trained on image pairs judged by a documented annotator rule that prefers crisp, solid strokes (an appearance the late denoising steps set) and, partly, the prompted digit.
- `imagerefl.mini.pretrain`: Train the embedded world's base text-to-image model, its reward and its feature network on handwritten digits, in minutes on a CPU, and write them as safetensors.
- `imagerefl.rewards.registry`: HPSv2/2.1, ImageReward, PickScore, CLIP score and MPS as differentiable `nn.Module`s: images in [0, 1] and prompts in, one score per image out, with each model's own preprocessing done in torch."""

__version__ = "0.1.0"
