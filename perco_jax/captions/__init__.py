"""Image -> caption: the captioners (`captioner`), the caption cache (`cache`) and the text modes
(`text_modes`)."""
