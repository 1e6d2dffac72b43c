"""The method of "Language models can explain neurons in language models" (OpenAI, 2023) as
plain Python: streaming activation records and their splits (`records`), explainer and
simulator prompts (`prompts`), expected values from the simulator's digit distribution
(`simulation`), pooled correlation scores (`scoring`) and the token baseline explainer
(`baseline`). Plain data in, plain data out (numpy arrays, lists, dicts, str); numpy and the
standard library only, so every formula can be unit-tested without a model or a pipeline.
"""
