// Shows the captions / answers of "UniAlign Understand" on the node after it has run.
// The node returns {"ui": {"text": [...]}}; ComfyUI hands that to onExecuted.
// Works with the classic frontend (2024) and the current one (through its scripts/ shims).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_ID = "UniAlignUnderstand";
const WIDGET_NAME = "result_text";

function showText(node, texts) {
  const list = Array.isArray(texts) ? texts : [texts];
  const value = list.length > 1 ? list.map((t, i) => `[${i + 1}] ${t}`).join("\n\n") : String(list[0] ?? "");
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.options = { ...(widget.options || {}), serialize: false }; // never sent as an input
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = value;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    size[0] = Math.max(size[0], node.size[0]);
    size[1] = Math.max(size[1], node.size[1]);
    node.setSize?.(size);
    node.setDirtyCanvas?.(true, false);
  });
}

app.registerExtension({
  name: "UniAlignment.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
    };
  },
});
