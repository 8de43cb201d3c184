"""The run loop (loop.py) and the rooms it orders in each step: start-up, the
partitions owned through their lifecycle (restore and rebuild over one catch-up
reader), checkpoints (policy and delivery), housekeeping, the topics' layout and
the shutdown deadline. The only place where Kafka I/O, state and the engines meet.
"""
