// Card entry for the portal: Stripe.js mounts its card field, confirms the SetupIntent the
// page was made with, and the form then sends only the SetupIntent's id. Loaded as a file
// (the CSP allows no inline script). The card number never reaches leadflow.
(function () {
  "use strict";
  var form = document.getElementById("card-form");
  if (!form || typeof Stripe === "undefined") { return; }
  var stripe = Stripe(form.dataset.key);
  var card = stripe.elements().create("card");
  card.mount("#card-element");
  var errorBox = document.getElementById("card-error");
  var busy = false;
  form.addEventListener("submit", function (event) {
    if (document.getElementById("setup-intent").value) { return; }  // confirmed: send it
    event.preventDefault();
    if (busy) { return; }
    busy = true;
    stripe.confirmCardSetup(form.dataset.secret, { payment_method: { card: card } })
      .then(function (result) {
        if (result.error) {
          errorBox.textContent = result.error.message || "The card was refused.";
          errorBox.classList.remove("hidden");
          busy = false;
          return;
        }
        document.getElementById("setup-intent").value = result.setupIntent.id;
        form.submit();
      });
  });
}());
