// TADiSR Load Image from Folder: a freshly added node walks the folder (index control = increment).
// ComfyUI's frontend gives every INT control "randomize" by default; a loaded workflow keeps its saved value.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "tadisr.folderLoader",
  nodeCreated(node) {
    if (node.comfyClass !== "TADiSRLoadImageFromFolder") return;
    const control = (node.widgets || []).find((w) => w.name === "control_after_generate");
    if (control) control.value = "increment";
  },
});
