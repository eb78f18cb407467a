"""Delivery: the loop that takes due messages from the queue to their next hop."""
