"""The configs that ship with moa, installed as `moa.configs`: demo, synth, tasks, train and deepspeed.

Read them through `moa.resources`.
"""
