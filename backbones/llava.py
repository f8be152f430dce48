"""LLaVA-1.5-7B: CLIP ViT-L/336 patch features (penultimate layer, CLS dropped), a 2-layer MLP
projector and a Vicuna decoder; ``<image>`` sits in the prompt and expands to one token per patch."""
import torch
from transformers import LlavaForConditionalGeneration

from backbones.base import VLBackbone
from backbones.loading import load_pretrained
from backbones.stacks import LlamaStack


class LlavaBackbone(VLBackbone):
    family = "llava"
    model_class = LlavaForConditionalGeneration

    @classmethod
    def load(cls, name, path, device="cpu", dtype=None):
        return cls.wrap(name, *load_pretrained(cls.model_class, path, device, dtype))

    @classmethod
    def wrap(cls, name, model, processor):
        """The wrapper of a model already built or loaded (e.g. ``backbones/real_configs.py``)."""
        cfg = model.config
        vc = cfg.vision_config
        n_patches = (vc.image_size // vc.patch_size) ** 2
        n_vision = n_patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        lm = model.model.language_model
        stack = LlamaStack(lm, model.lm_head, "model.language_model.layers.{}", cfg.text_config.hidden_size)
        return cls(name, model, processor, stack, n_vision)

    def prompt_text(self, prompt, has_image):
        image = f"{self.image_token * self.n_vision_tokens}\n" if has_image else ""
        return f"USER: {image}{prompt} ASSISTANT:"

    def connector_parameters(self):
        return list(self.model.model.multi_modal_projector.parameters())

    def vision_side_parameters(self):
        return [*self.model.model.vision_tower.parameters(), *self.connector_parameters()]

    def image_features(self, pixel_values):
        cfg = self.model.config
        out = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
