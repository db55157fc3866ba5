// Validates FHIR R4 JSON resources with the npm `fhir` package (an implementation independent
// of the Python fhir.resources models).  Reads a JSON array of resources on stdin; prints one
// JSON line per resource: {"valid": bool, "messages": [...errors and warnings...]}.
"use strict";
const { Fhir } = require("fhir");

const fhir = new Fhir();
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const resources = JSON.parse(input);
  for (const resource of resources) {
    const result = fhir.validate(resource, { errorOnUnexpected: true });
    const messages = (result.messages || []).filter((m) => m.severity === "error");
    process.stdout.write(JSON.stringify({ valid: result.valid, messages }) + "\n");
  }
});
