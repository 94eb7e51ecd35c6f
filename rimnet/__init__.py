"""Paramagnetic rim lesion scoring: lesions, patches, a rule-based detector and a MONAI CNN."""
