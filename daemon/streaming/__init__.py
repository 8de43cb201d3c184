"""The run loop and what it delegates to: the partition lifecycle, restore, the
checkpoint policy and delivery. The only place where Kafka I/O, state and the engines meet.
"""
