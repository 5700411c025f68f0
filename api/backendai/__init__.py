"""The Backend.AI kernel API dialect (seeds 000–002, API.md "Backend.AI dialect")."""
