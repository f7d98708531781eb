"""What the controller's signed word does on the endpoint: the policy in force (``policykeeper``), commands
and their checks, and failing closed when cut off or unable to record."""
