"""The base model as it is: nothing is trained."""

from ladm.methods.base import Method


class ZeroShot(Method):
    name = "zero_shot"
    trains = False
