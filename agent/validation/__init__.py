"""Validation: sequence protocol files, the rules that judge an acquisition, the validator stage and the one
decision on whether the model may run."""
