"""The synthetic world of the demo, the tests and `evev2 data synth`: scenes of coloured shapes and rendered words.

`layout` holds the vocabulary and the scene geometry, `render` draws a layout, `language` writes its captions and
question-answer pairs, and `world` is the deterministic stream of scenes and the writers (LLaVA JSON, WebDataset, text).
"""
