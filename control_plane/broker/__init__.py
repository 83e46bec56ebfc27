"""The MQTT broker side of the platform: topic ACLs, the embedded amqtt broker and Mosquitto config.

`acl.is_allowed` is the one rule set; the embedded broker calls it on every publish, subscribe and
delivery, and the Mosquitto ACL file is generated from the same `protocol.topics` sets.
"""
