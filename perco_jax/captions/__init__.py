"""Image -> caption: the captioners, the caption cache and the text modes (`captioner`)."""
