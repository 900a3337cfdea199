"""Sharing stores: ``reinforce publish`` (:mod:`.publish`), ``reinforce download`` (:mod:`.download`), the
manifest both trust (:mod:`.manifest`), and their command lines (:mod:`.cli`)."""
