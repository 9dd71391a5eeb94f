"""Lifetimes of saved tensors and plans for keeping, offloading or recomputing them."""
