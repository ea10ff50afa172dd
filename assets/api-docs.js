// The API reference at /api/docs: Swagger UI (assets/vendor/swagger-ui)
// over the server's own /api/openapi.json. A file of its own, since the
// Content-Security-Policy allows no inline script.
"use strict";

window.ui = window.SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // The page asks nothing of any other server: no badge from the public
  // validator.
  validatorUrl: null,
  presets: [window.SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
