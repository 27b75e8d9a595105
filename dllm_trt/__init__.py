"""dllm-trt: exported runtime for diffusion LMs with Elastic-Cache. See README.md."""
