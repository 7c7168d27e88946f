"""Development tooling, not shipped to ComfyUI users: the dev ComfyUI host (`comfy_host`), a client
for a running server (`server`), a headless Chromium driver (`browser`) and the example-workflow
builder (`build_workflows`). Tests use these; product code never imports them."""
