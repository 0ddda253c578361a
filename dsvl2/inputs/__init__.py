"""A request's inputs: images read and checked, and the processor that turns a prompt and its images into the
model's token ids and tiles."""
