"""The embedded mini world: a complete, tiny text-to-image world (captioned handwritten digits) that runs on a laptop CPU.

`components` (its tokenizer and noise schedule), `data` (the captioned digits), `nets` (its reward and feature
network, and where the shipped weights live), `pretrain` (training all of them) and `demo` (`imagerefl demo`). Nothing
outside this package imports it at import time: the Stable Diffusion path never loads it.

Written by hand (nbdev writes the modules, not this file)."""
