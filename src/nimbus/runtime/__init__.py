"""What runs inside an instance: the zygote, the bootstrap loop, the Lambda context."""
