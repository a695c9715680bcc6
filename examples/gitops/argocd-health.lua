-- Argo CD health check for ExplorerJob (explorer.rft.dev/v1alpha1), keyed on the job's phase and conditions.
-- Install it under the key resource.customizations.health.explorer.rft.dev_ExplorerJob of the argocd-cm
-- ConfigMap (docs/install.md shows the patch).
local hs = { status = "Progressing", message = "waiting for the operator to report" }
if obj.status == nil then
  return hs
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "the operator has not yet acted on generation " .. generation
  return hs
end

local conditions = {}
for _, condition in ipairs(status.conditions or {}) do
  conditions[condition.type] = condition
end
local function holds(name)
  return conditions[name] ~= nil and conditions[name].status == "True"
end
local function said(name, fallback)
  local condition = conditions[name]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end

if status.phase == "Failed" or holds("Failed") then
  hs.status = "Degraded"
  hs.message = said("Failed", "the job failed")
elseif status.phase == "Suspended" or holds("Suspended") then
  hs.status = "Suspended"
  hs.message = "suspended: every pod removed"
elseif status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "explored every step"
elseif holds("Degraded") then
  hs.status = "Degraded"
  hs.message = said("Degraded", "degraded")
elseif holds("Ready") then
  hs.status = "Healthy"
  local step = status.step or 0
  local total = status.totalSteps or 0
  hs.message = "exploring: step " .. step .. "/" .. total
  if status.policyVersion ~= nil then
    hs.message = hs.message .. ", policy version " .. status.policyVersion
  end
else
  hs.message = said("Ready", "starting: phase " .. (status.phase or "Pending"))
end
return hs
