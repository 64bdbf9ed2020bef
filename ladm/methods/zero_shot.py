"""The base model as it is: nothing is trained."""

from ladm.methods.base import Method


class ZeroShot(Method):
    name = "zero_shot"
    trains = False

    def load(self, model, folder):
        """Nothing was trained, so there is nothing to load."""
        return model
