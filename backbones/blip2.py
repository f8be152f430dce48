"""BLIP-2 OPT-2.7B: ViT + Q-Former + linear projection; the query outputs are placed *before* BOS."""
from transformers import Blip2ForConditionalGeneration

from backbones.base import VLBackbone
from backbones.loading import load_pretrained
from backbones.stacks import stack_for_causal_lm


class Blip2Backbone(VLBackbone):
    family = "blip2"
    model_class = Blip2ForConditionalGeneration

    @classmethod
    def load(cls, name, path, device="cpu", dtype=None):
        return cls.wrap(name, *load_pretrained(cls.model_class, path, device, dtype))

    @classmethod
    def wrap(cls, name, model, processor):
        """The wrapper of a model already built or loaded (e.g. ``backbones/real_configs.py``)."""
        n_query = model.config.num_query_tokens
        # Processor configs saved by older transformers lack num_query_tokens: without it the
        # processor adds no image tokens and BLIP-2 silently ignores the image.
        if getattr(processor, "num_query_tokens", None) is None:
            processor.num_query_tokens = n_query
        image_id = processor.tokenizer.convert_tokens_to_ids(cls.image_token)
        if model.config.image_token_id is None:  # older checkpoints had no image placeholder token
            model.config.image_token_id = image_id
            if image_id >= model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(processor.tokenizer))
        return cls(name, model, processor, stack_for_causal_lm(model.language_model, "language_model"), n_query)

    def prompt_text(self, prompt, has_image):
        return prompt

    def prefix_ids(self, has_image):
        return [self.image_token_id] * self.n_vision_tokens if has_image else []

    def connector_parameters(self):
        # BLIP-2 and MiniGPT-4: the Q-Former with its learned queries, then the linear projection
        m = self.model
        return [*m.qformer.parameters(), m.query_tokens, *m.language_projection.parameters()]

    def vision_side_parameters(self):
        return [*self.model.vision_model.parameters(), *self.connector_parameters()]

    def image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
