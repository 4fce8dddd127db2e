"""The model components (thinker, talker with its code predictor, Code2Wav) and the registry that lists them."""
