"""Values in a Schema Registry's formats: Avro and JSON Schema, in Confluent's wire
format (magic byte 0, a 4-byte schema id, the payload).

`framing` reads and writes the five-byte header; `registry` speaks the registry's
REST API; `cache` keeps each schema fetched once per pod; `formats` turns a schema
into a reader and a writer; `wire` builds the `codec.Wire` the processor uses and
resolves the schemas a batch names before the processor sees it, so decoding never
waits on the network and a registry outage is never taken for a bad record.
"""
