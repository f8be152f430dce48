"""One record structure for every dataset: an edit request plus its generality and locality samples."""
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from utils.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One query: a task prompt (before the backbone's chat template), its target answer (no leading
    space: the backbone adds one when needed) and an optional image path, opened lazily."""

    prompt: str
    target: str
    image: str | None = None


@dataclass(frozen=True)
class EditRecord:
    index: int
    edit: Sample            # reliability: the edit request itself
    text_rephrase: Sample   # T-Gen: rephrased prompt, same image
    image_rephrase: Sample  # M-Gen: same prompt, rephrased image
    text_loc: Sample        # T-Loc: unrelated text-only question
    image_loc: Sample       # M-Loc: unrelated image and question
    pred: str | None = None  # the unedited model's answer as given by the dataset
    # Port: questions about the edit image whose answers follow from the edit (VLKEB ``port_new``);
    # any number, often none
    portability: tuple[Sample, ...] = ()

    def samples(self):
        """The five samples by metric name, in report order."""
        return {"rel": self.edit, "t_gen": self.text_rephrase, "m_gen": self.image_rephrase,
                "t_loc": self.text_loc, "m_loc": self.image_loc}


def open_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is a UserError naming the path."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"image unreadable: {path} ({e})") from None
