"""HPSv2/2.1, ImageReward, PickScore, CLIP score and MPS as differentiable `nn.Module`s: images in [0, 1] and prompts in,
one score per image out, with each model's own preprocessing done in torch.

One module per family: `preprocess` (resize, crop, normalise in torch; each official scorer's preprocessing), `registry` (the reward interface, names and
`load_reward`), `clip` (HPS on open_clip; PickScore and CLIP score on transformers CLIP), `imagereward` (BLIP) and `mps`.
Importing this package registers every family, so `load_reward(name)` knows them all.

Written by hand (nbdev writes the modules, not this file)."""

from .preprocess import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_center_crop, normalize, PREPROCESSING, check_preprocessing,
                         to_uint8_pil, hps_eval_pixels, imagereward_eval_pixels, clip_image_processor, clip_processor_pixels)
from .registry import (Reward, as_image_batch, check_reward_inputs, check_reward_output, RewardContract, reward_contract,
                       register_reward, reward_names, check_reward_name, checkpoint_blocks, load_reward, resolve_file, REWARDS)
from .clip import (OpenCLIPReward, open_clip_model, load_hps_state_dict, state_dict_mismatch, load_hps_v21, load_hps_v2,
                   HFCLIPReward, load_pickscore, load_clip_score, processor_folder, hf_clip_parts, CLIPProcessorEvaluation)
from .imagereward import ImageRewardReward, load_imagereward, bert_tokenizer
from .mps import MPSReward, MPSCrossModel, convert_mps_checkpoint, read_mps_pickle, load_mps

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "resize_center_crop", "normalize", "PREPROCESSING", "check_preprocessing",
           "to_uint8_pil", "hps_eval_pixels", "imagereward_eval_pixels", "clip_image_processor", "clip_processor_pixels", "Reward", "as_image_batch",
           "check_reward_inputs", "check_reward_output", "RewardContract", "reward_contract", "register_reward", "reward_names", "check_reward_name", "checkpoint_blocks", "load_reward",
           "resolve_file", "REWARDS", "OpenCLIPReward", "open_clip_model", "load_hps_state_dict", "state_dict_mismatch",
           "load_hps_v21", "load_hps_v2", "HFCLIPReward", "load_pickscore", "load_clip_score", "processor_folder",
           "hf_clip_parts", "CLIPProcessorEvaluation", "ImageRewardReward", "load_imagereward", "bert_tokenizer", "MPSReward", "MPSCrossModel",
           "convert_mps_checkpoint", "read_mps_pickle", "load_mps"]
