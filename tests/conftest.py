pytest_plugins = [
    "tests.harness.kube",
    "tests.harness.s3",
    "tests.harness.tools",
    "tests.harness.cluster",
    "tests.harness.skips",
    "pytester",
]
