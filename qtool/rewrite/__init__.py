"""Rewriters: apply a Plan to a model. They decide nothing."""
