"""MiniGPT-4 (Vicuna-7B): BLIP-2's ViT + Q-Former, a linear projection (``llama_proj``) and a Llama
decoder, held as one ``Blip2ForConditionalGeneration`` with a Llama text config (see
scripts/convert_minigpt4.py). The image sits inside MiniGPT-4's prompt template."""
from backbones.blip2 import Blip2Backbone


class MiniGPT4Backbone(Blip2Backbone):
    family = "minigpt4"

    def prompt_text(self, prompt, has_image):
        image = f"<Img>{self.image_token * self.n_vision_tokens}</Img> " if has_image else ""
        return f"###Human: {image}{prompt} ###Assistant: "

    def prefix_ids(self, has_image):
        return []
